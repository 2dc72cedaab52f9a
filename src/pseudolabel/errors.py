"""The exception for problems a user can cause and fix, and the one for a preempted training."""


class PseudoLabelError(Exception):
    """A user-fixable problem: the message says what was wrong, where, and what to do."""


class Preempted(Exception):  # noqa: N818 (what happened, not an error of the input)
    """A SIGTERM stopped a training at a step boundary; its last epoch's state is saved
    (pseudolabel.resume) and the next run of the stage resumes from it."""

    exit_code = 143  # 128 + SIGTERM: what a shell reports for a process ended by SIGTERM
