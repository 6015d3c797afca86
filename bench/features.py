"""What each gateway feature costs in the running gateway: requests/s and CPU per request at c=64.

    .venv/bin/python bench/features.py [--runs 3] [--seconds 6]

One fast upstream (bench/fast_upstream.py); for each configuration a fresh gateway, a 2 s
wrk warm-up, then `--runs` wrk runs at c=64. Prints the median and the range of each, so
a row can be read against the run-to-run noise of a shared 2-core machine (±10-20 %).
Configurations go from the API key alone to everything on, one feature added at a time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import HERE, cpu_seconds, free_port, process, say
from run import wrk

HIGH = {
    "BASTION_RATE_LIMIT_RPM": "100000000",
    "BASTION_RATE_LIMIT_TPM": "100000000000",
    "BASTION_RATE_LIMIT_MAX_CONCURRENT": "100000",
}
OFF = {
    "BASTION_RATE_LIMIT_RPM": "0",
    "BASTION_RATE_LIMIT_TPM": "0",
    "BASTION_RATE_LIMIT_MAX_CONCURRENT": "0",
    "BASTION_AUTH_FAILURE_LIMIT": "0",
    "BASTION_METRICS_ENABLED": "false",
    "BASTION_AUDIT_LOG": "off",
}


def configurations(audit: Path) -> list[tuple[str, dict[str, str]]]:
    metrics = {"BASTION_METRICS_ENABLED": "true", "BASTION_METRICS_TOKEN": "bench-metrics-token-0123456789"}
    everything = {**HIGH, **metrics, "BASTION_ALLOW_IPS": "127.0.0.0/8", "BASTION_AUDIT_LOG": str(audit)}
    return [
        ("API key only", OFF),
        ("+ failed-login budget", {**OFF, "BASTION_AUTH_FAILURE_LIMIT": "20"}),
        ("+ IP allowlist", {**OFF, "BASTION_ALLOW_IPS": "127.0.0.0/8"}),
        ("+ requests/min", {**OFF, "BASTION_RATE_LIMIT_RPM": HIGH["BASTION_RATE_LIMIT_RPM"]}),
        ("+ tokens/min", {**OFF, "BASTION_RATE_LIMIT_TPM": HIGH["BASTION_RATE_LIMIT_TPM"]}),
        ("+ concurrency", {**OFF, "BASTION_RATE_LIMIT_MAX_CONCURRENT": "100000"}),
        ("+ metrics", {**OFF, **metrics}),
        ("+ audit log (file)", {**OFF, "BASTION_AUDIT_LOG": str(audit)}),
        ("everything (as bench/run.py)", everything),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=6)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bastion-features-"))
    python = sys.executable
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("BASTION_", "VLLM_"))}
    keys_env = {**base_env, "BASTION_KEYS_FILE": str(work / "keys.json"), "BASTION_LOG_LEVEL": "warning"}
    key = subprocess.run(
        [python, "-m", "bastion", "keys", "create", "--name", "bench"], env=keys_env, capture_output=True, text=True,
        check=True,
    ).stdout.strip()  # fmt: skip
    up_port, gw_port = free_port(), free_port()
    upstream = [python, str(HERE / "fast_upstream.py"), "--port", str(up_port)]
    rows = []
    with process(upstream, base_env, f"http://127.0.0.1:{up_port}/health", work / "upstream.log"):
        for name, settings in configurations(work / "audit.jsonl"):
            say(name)
            gateway = [python, "-m", "bastion", "serve", "--port", str(gw_port), "--upstream-url",
                       f"http://127.0.0.1:{up_port}"]  # fmt: skip
            env = {**keys_env, **settings}
            with process(gateway, env, f"http://127.0.0.1:{gw_port}/ready", work / "gateway.log") as proc:
                url = f"http://127.0.0.1:{gw_port}"
                wrk(url, key, 64, 2, work)  # warm-up
                rps, cpu = [], []
                for _ in range(args.runs):
                    before = cpu_seconds(proc.pid)
                    row = wrk(url, key, 64, args.seconds, work)
                    if row["errors"]:
                        sys.exit(f"bench: {row['errors']} non-2xx responses in {name!r}; see {work}/gateway.log")
                    rps.append(row["rps"])
                    cpu.append((cpu_seconds(proc.pid) - before) / row["requests"] * 1e6)
            rows.append((name, rps, cpu))
    print("| configuration | requests/s (median, range) | CPU per request (median, range) |")
    print("|---|---|---|")
    for name, rps, cpu in rows:
        print(
            f"| {name} | {statistics.median(rps):,.0f} ({min(rps):,.0f}–{max(rps):,.0f}) "
            f"| {statistics.median(cpu):.0f} µs ({min(cpu):.0f}–{max(cpu):.0f}) |"
        )


if __name__ == "__main__":
    main()
