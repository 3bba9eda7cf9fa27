"""Delta-update benchmark: the bytes a device fetches for an update, as a delta and as the whole bundle.

Bundles are made by the real packager (``package``: graph optimization, samples, signing) from a digits
MLP with two hidden layers (256 and 128 units, skl2onnx, 205 KB of weights of which 10 KB in the output
layer). Each update is a second bundle of the same model name: a new entry script, a new input sample,
the output layer alone retrained (:func:`packager.examples.build_digits_deep_mlp` with ``head_seed``; in
fp32, and both versions quantized to dynamic int8), and the network trained again from another seed.

For each, the real ``BundleServer`` (in this process, on loopback) serves the old and the new bundle and
:func:`edge_agent.fetch.fetch_bundle` fetches the new one on a "device" that holds the old one unpacked;
the bytes sent (response bodies) are counted from the server's own access log lines, and the rebuilt file
is compared with the new bundle byte for byte. The target is a delta of at most 20 % of the bundle when
only the last layer changed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import print_table, write_results

TARGET_RATIO = 0.20
HIDDEN = (256, 128)
SCORE = "def init():\n    pass\n\n\ndef run(data):\n    return {{'release': {release}}}\n"


class _SentBytes(logging.Handler):
    """Adds up the bundle server's ``sent N bytes of PATH`` lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.total = 0

    def emit(self, record: logging.LogRecord) -> None:
        match = re.match(r"sent (\d+) bytes of ", record.getMessage())
        if match:
            self.total += int(match.group(1))


def _bundles(work: Path) -> tuple[Path, list[tuple[str, Path, Path]]]:
    """(the base ONNX model, [(update, old bundle, new bundle)]) made by the packager."""
    from packager.examples import build_digits_deep_mlp, digits_data
    from packager.packaging import package

    models = work / "models"
    base = build_digits_deep_mlp(models / "base.onnx", HIDDEN)
    head = build_digits_deep_mlp(models / "head.onnx", HIDDEN, head_seed=1)
    full = build_digits_deep_mlp(models / "full.onnx", HIDDEN, seed=1)
    samples = []
    for row in (0, 9):
        sample = work / f"sample-{row}.json"
        sample.write_text(json.dumps({"data": [digits_data().x_test[row].round(4).tolist()]}))
        samples.append(sample)
    scripts = []
    for release in (1, 2):
        script = work / f"score-{release}" / "score.py"
        script.parent.mkdir()
        script.write_text(SCORE.format(release=release))
        scripts.append(script)

    def bundle(name: str, model: Path, **options: Any) -> Path:
        out = work / "bundles" / f"{name}.edb"
        package(model, "cpu-x86_64", out, name="digits", input_sample=options.pop("sample", samples[0]), **options)
        return out

    plain = bundle("base", base)
    return base, [
        ("new entry script", bundle("script-1", base, entry_script=scripts[0]),
         bundle("script-2", base, entry_script=scripts[1])),
        ("new input sample", plain, bundle("samples", base, sample=samples[1])),
        ("last layer retrained", plain, bundle("head", head)),
        ("last layer retrained, int8", bundle("base-int8", base, quantize="dynamic-int8"),
         bundle("head-int8", head, quantize="dynamic-int8")),
        ("fully retrained", plain, bundle("full", full)),
    ]


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = call()
    return result, (time.perf_counter() - start) * 1000.0


def _measure(update: str, old: Path, new: Path, work: Path, counter: _SentBytes) -> dict[str, Any]:
    from edge_agent.bundle import bundle_sha256, open_bundle
    from edge_agent.delta import DeltaBase
    from edge_agent.fetch import fetch_bundle
    from packager.bundle_server import BundleServer, bundles_dir, publish_bundle
    from packager.delta import delta_cache_path, make_delta

    slot = work / "device" / update.replace(" ", "-").replace(",", "") / "slot"
    open_bundle(old, slot)
    old_sha, _ = publish_bundle(old)
    sha, url_path = publish_bundle(new)
    store = bundles_dir()  # made where the server caches it, so the fetch times the transfer and the rebuild
    summary, make_ms = _timed(lambda: make_delta(store / f"{old_sha}.edb", store / f"{sha}.edb",
                                                 delta_cache_path(store, sha, old_sha)))
    server = BundleServer(port=0)
    server.start()
    try:
        counter.total = 0
        path, fetch_ms = _timed(lambda: fetch_bundle(server.url + url_path, sha, slot.parent / "downloads",
                                                     base=DeltaBase(old_sha, slot)))
    finally:
        server.stop()
    size = new.stat().st_size
    return {"update": update, "bundle_bytes": size, "sent_bytes": counter.total,
            "sent_percent": round(100.0 * counter.total / size, 1), "delta_bytes": summary.size,
            "copied_kb": round(summary.copied / 1024, 1), "patched_kb": round(summary.patched / 1024, 1),
            "literal_kb": round(summary.literal / 1024, 1), "make_ms": round(make_ms, 1),
            "fetch_ms": round(fetch_ms, 1),
            "identical": bundle_sha256(path) == sha and path.read_bytes() == new.read_bytes()}


def main() -> None:
    """Run the delta benchmark and write ``bench/results/delta.json``."""
    from packager.keys import generate_key

    counter = _SentBytes()
    server_log = logging.getLogger("packager.bundle_server")
    server_log.addHandler(counter)
    server_log.setLevel(logging.INFO)
    server_log.propagate = False  # counted, not printed over the table
    old_home = os.environ.get("EDGEDEPLOY_HOME")
    try:
        with tempfile.TemporaryDirectory(prefix="edgedeploy-delta-bench-") as tmp:
            work = Path(tmp)
            os.environ["EDGEDEPLOY_HOME"] = str(work / "home")
            generate_key()
            base, updates = _bundles(work)
            rows = [_measure(update, old, new, work, counter) for update, old, new in updates]
            model_kb = round(base.stat().st_size / 1024, 1)
    finally:
        server_log.removeHandler(counter)
        server_log.propagate = True
        if old_home is None:
            os.environ.pop("EDGEDEPLOY_HOME", None)
        else:
            os.environ["EDGEDEPLOY_HOME"] = old_home
    print_table(rows, ["update", "bundle_bytes", "sent_bytes", "sent_percent", "copied_kb", "patched_kb",
                       "literal_kb", "make_ms", "fetch_ms", "identical"])
    head = next(r for r in rows if r["update"] == "last layer retrained")
    met = head["sent_percent"] <= 100 * TARGET_RATIO
    print(f"target (last layer retrained <= {100 * TARGET_RATIO:.0f} % of the bundle): "
          f"{'met' if met else 'missed'} at {head['sent_percent']} %")
    write_results("delta", {"rows": rows, "model": {"hidden": list(HIDDEN), "onnx_kb": model_kb},
                            "target_ratio": TARGET_RATIO, "target_met": met})


if __name__ == "__main__":
    main()
