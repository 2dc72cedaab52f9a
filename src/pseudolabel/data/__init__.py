"""Data: built-in sources, the on-disk layout, and tf.data pipelines over image folders."""
