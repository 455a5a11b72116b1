"""Print a compact table from a pytest-benchmark JSON file: name, median ms, and the extra_info figures."""

import json
import sys

KEYS = ("tflops", "TFLOP/s", "gbps", "GB/s", "ratio", "speedup", "peak", "audio", "hours", "frac", "roofline")


def main(path):
    with open(path) as f:
        data = json.load(f)
    info = data.get("machine_info", {})
    print(f"# {data.get('datetime', '')}  {info.get('node', '')}")
    print(f"{'benchmark':60s} {'median ms':>10s}  extra")
    for b in data["benchmarks"]:
        med = b["stats"]["median"] * 1e3
        extra = {k: v for k, v in b.get("extra_info", {}).items()
                 if any(s in k for s in KEYS) and isinstance(v, (int, float))}
        ext = "  ".join(f"{k}={v:.3g}" for k, v in extra.items())
        print(f"{b['name'][:60]:60s} {med:10.3f}  {ext}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench-gpu.json")
