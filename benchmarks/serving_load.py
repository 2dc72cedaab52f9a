"""The served model under load, against a bare `model.predict` on the same machine (issue 33).

Logs a trained model (a `.keras` file with its metadata JSON beside it, as the pipeline saves
`models/student.keras`) as the pipeline's pyfunc (`pseudolabel.registry.log_serving_model`,
into a scratch sqlite store), starts `mlflow models serve` on localhost from it, and for each
concurrency level runs that many clients for a fixed time, each sending requests of `--batch`
PNG images (base64, `dataframe_split`) one after another. Per level: requests and images per
second, latency p50/p99 (ms) and errors. The reference is the same model's `predict` in this
process on the same images already decoded (what the server adds: HTTP, JSON, base64, PNG
decoding and resizing). Then one request per kind of bad input, each of which must get a 400
whose message names the reason and holds no stack trace.

    python benchmarks/serving_load.py --model models/student.keras
    python benchmarks/serving_load.py --model models/student.keras --concurrency 1 4 8 \\
        --seconds 20 --batch 16

(python: `PYTHONPATH=src .venv/bin/python`.) The result is written to
benchmarks/results/serving_load.json (one entry per model file name and batch size).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ssl_gain import cpu_model  # noqa: E402

from pseudolabel.atomic import write_text_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "serving_load.json"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pngs(meta: dict, n: int, seed: int = 0) -> tuple[list[bytes], np.ndarray]:
    """`n` random images of the model's size and channels, as PNG files and as pixels."""
    h, w = meta["image_size"]
    channels = int(meta["channels"])
    rng = np.random.default_rng(seed)
    shape = (n, h, w) if channels == 1 else (n, h, w, channels)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    files = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        files.append(buffer.getvalue())
    return files, pixels.reshape(n, h, w, channels).astype(np.float32)


def _body(files: list[bytes]) -> bytes:
    data = [[base64.b64encode(f).decode()] for f in files]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": data}}).encode()


def _post(url: str, body: bytes, timeout: float = 60) -> tuple[int, bytes]:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"p50_ms": None, "p99_ms": None}
    ms = np.asarray(latencies) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1)}  # fmt: skip


def load(url: str, body: bytes, batch: int, clients: int, seconds: float) -> dict:
    """`clients` threads, each posting `body` back to back for `seconds`."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client():
        while time.perf_counter() < stop:
            start = time.perf_counter()
            try:
                status, _ = _post(url, body)
            except OSError:
                status = -1
            elapsed = time.perf_counter() - start
            with lock:
                if status == 200:
                    latencies.append(elapsed)
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - begin
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors[0],
        "requests_per_s": round(len(latencies) / wall, 2),
        "images_per_s": round(len(latencies) * batch / wall, 1),
        **_percentiles(latencies),
    }


def bare(model_path: Path, pixels: np.ndarray, seconds: float) -> dict:
    """The same model's predict on decoded images in this process, one batch after another."""
    import keras

    model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    model.predict(pixels, verbose=0)  # warm-up (graph tracing)
    latencies = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        start = time.perf_counter()
        model.predict(pixels, batch_size=len(pixels), verbose=0)
        latencies.append(time.perf_counter() - start)
    total = sum(latencies)
    return {
        "requests": len(latencies),
        "images_per_s": round(len(latencies) * len(pixels) / total, 1),
        **_percentiles(latencies),
    }


BAD = {
    "not an image": [b"%PDF-1.4 not a picture"],
    "0 bytes": [b""],
    "no images": [],
}


def bad_input(url: str, good: bytes, max_images: int) -> dict:
    """One request per kind of bad input: its status and whether the answer is clean."""
    cases = {**BAD, f"more than {max_images} images": [good] * (max_images + 1)}
    out = {}
    for name, files in cases.items():
        status, answer = _post(url, _body(files))
        text = answer.decode(errors="replace")
        out[name] = {
            "status": status,
            "message": json.loads(text).get("message", "")[-160:] if text.startswith("{") else text,
            "stack_trace": "stack_trace" in text or "Traceback" in text,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a .keras file with its .json")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--batch", type=int, default=16, help="images per request")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import mlflow

    from pseudolabel import registry, serving

    meta = json.loads(args.model.with_suffix(".json").read_text())
    files, pixels = _pngs(meta, args.batch)
    scratch = Path(tempfile.mkdtemp(prefix="serving_load_"))
    uri = f"sqlite:///{scratch / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    run = mlflow.MlflowClient(uri).create_run(experiment_id="0")
    info = registry.log_serving_model(args.model, run.info.run_id)
    mlflow.MlflowClient(uri).set_terminated(run.info.run_id)
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}:{os.environ['PATH']}"}
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", info.model_uri, "--env-manager", "local",
         "-p", str(port), "-h", "127.0.0.1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(base + "/ping", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    print("the model server did not start", file=sys.stderr)
                    return 1
                time.sleep(1)
        url = base + "/invocations"
        body = _body(files)
        _post(url, body)  # warm-up
        levels = []
        for clients in args.concurrency:
            result = load(url, body, args.batch, clients, args.seconds)
            print(json.dumps(result), flush=True)
            levels.append(result)
        refused = bad_input(url, files[0], serving.MAX_IMAGES)
        print(json.dumps(refused), flush=True)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    reference = bare(args.model, pixels, args.seconds)
    print(json.dumps({"bare_predict": reference}), flush=True)
    entry = {
        "model": args.model.name,
        "image_size": meta["image_size"],
        "channels": meta["channels"],
        "batch": args.batch,
        "seconds_per_level": args.seconds,
        "server": levels,
        "bare_predict": reference,
        "bad_input": refused,
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "command": " ".join(["python", "benchmarks/serving_load.py", *sys.argv[1:]]),
    }
    payload = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    payload["rows"] = [
        r for r in payload["rows"] if (r["model"], r["batch"]) != (entry["model"], args.batch)
    ] + [entry]
    write_text_atomic(args.out, json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
