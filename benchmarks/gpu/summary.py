"""One screen from a device check's results: reads OUT/*.json (and OUT/gpu_tests.xml,
OUT/stages.tsv, the sanitizer logs), prints the verdicts against issue 22's targets, and writes
OUT/summary.json.

    python -m benchmarks.gpu.summary OUT
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

# issue 22's bars (Azure mix, head_dim 128, 32/8 heads; SmolLM2 shape for end-to-end)
MIN_SPEEDUP_VS_FA2 = 0.8
MIN_SPEEDUP_VS_PADDED_SDPA = 3.0
MIN_E2E_SPEEDUP = {1: 10.0, 256: 3.0}


def _load(out: str, name: str) -> dict | None:
    path = os.path.join(out, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def stages(out: str) -> list[dict]:
    """OUT/stages.tsv lines: name, status (ok, failed, timeout, skipped), seconds, note."""
    path = os.path.join(out, "stages.tsv")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 3:
                    rows.append({"stage": parts[0], "status": parts[1], "seconds": float(parts[2] or 0), "note": parts[3] if len(parts) > 3 else ""})
    return rows


def pytest_counts(out: str) -> dict | None:
    path = os.path.join(out, "gpu_tests.xml")
    if not os.path.exists(path):
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed_names"] = [
        f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase") if c.find("failure") is not None or c.find("error") is not None
    ][:20]
    return counts


def sanitizer(out: str, tool: str) -> dict | None:
    path = os.path.join(out, "logs", f"{tool}.log")
    if not os.path.exists(path):
        return None
    with open(path, errors="replace") as f:
        text = f.read()
    # memcheck ends "ERROR SUMMARY: N errors"; racecheck "RACECHECK SUMMARY: H hazards displayed (N errors, W warnings)"
    m = re.findall(r"ERROR SUMMARY: (\d+) error", text) or re.findall(r"RACECHECK SUMMARY: .*?\((\d+) error", text)
    return {"errors": int(m[-1]) if m else None, "clean": bool(m) and int(m[-1]) == 0}


def verdicts(out: str) -> dict:
    kernels, check, thr, smoke = (_load(out, n) for n in ("kernels", "e2e_check", "e2e_throughput", "smoke"))
    v: dict = {"env": (smoke or kernels or check or thr or {}).get("env"), "stages": stages(out)}
    v["smoke_ok"] = smoke["ok"] if smoke else None
    v["gpu_tests"] = pytest_counts(out)
    v["e2e_check"] = {s["spec"]: s["ok"] for s in check["shapes"]} if check else None
    if kernels:
        az = next((s for s in kernels["speedups"] if s["mix"] == "azure" and s["shape"] == "llama3-8b"), None)
        v["kernels"] = kernels["speedups"]
        if az:
            v["kernel_targets"] = {
                "vs_fa2_varlen": az.get("speedup_vs_fa2_varlen"),
                "vs_fa2_ok": (az.get("speedup_vs_fa2_varlen") or 0) >= MIN_SPEEDUP_VS_FA2,
                "vs_padded_sdpa": az.get("speedup_vs_sdpa_padded_flash"),
                "vs_padded_sdpa_ok": (az.get("speedup_vs_sdpa_padded_flash") or 0) >= MIN_SPEEDUP_VS_PADDED_SDPA,
            }
    if thr:
        v["throughput"] = thr["rows"]
        v["hf"] = thr["hf"]
        v["e2e_targets"] = {
            str(b): next((r.get("speedup_vs_hf", 0) >= bar for r in thr["rows"] if r["batch"] == b), None)
            for b, bar in MIN_E2E_SPEEDUP.items()
        }
    v["memcheck"] = sanitizer(out, "memcheck")
    v["racecheck"] = sanitizer(out, "racecheck")
    return v


def render(v: dict) -> str:
    env = v.get("env") or {}
    lines = [f"== lenserve device check: {env.get('device', '?')} | torch {env.get('torch', '?')} CUDA {env.get('torch_cuda', '?')} | {env.get('date', '?')}"]
    for s in v["stages"]:
        lines.append(f"  stage {s['stage']:12s} {s['status']:8s} {s['seconds']:6.0f}s {s['note']}")
    lines.append(f"  smoke ops ok: {v['smoke_ok']}")
    t = v.get("gpu_tests")
    if t:
        lines.append(f"  gpu tests: {t['tests']} run, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped")
        lines += [f"    FAILED {n}" for n in t["failed_names"][:8]]
    if v.get("e2e_check"):
        lines.append("  e2e check: " + ", ".join(f"{k} {'ok' if ok else 'FAILED'}" for k, ok in v["e2e_check"].items()))
    for s in v.get("kernels") or []:
        ratios = " ".join(f"{k.replace('speedup_vs_', '')}={x}x" for k, x in s.items() if k.startswith("speedup"))
        lines.append(f"  kernels {s['mix']:8s} {s['shape']:10s} {ratios}")
    if v.get("kernel_targets"):
        kt = v["kernel_targets"]
        lines.append(f"  target azure hd128: >= {MIN_SPEEDUP_VS_FA2}x FA2 varlen: {kt['vs_fa2_ok']} ({kt['vs_fa2_varlen']}x); "
                     f">= {MIN_SPEEDUP_VS_PADDED_SDPA}x padded SDPA: {kt['vs_padded_sdpa_ok']} ({kt['vs_padded_sdpa']}x)")
    for r in v.get("throughput") or []:
        lines.append(f"  e2e batch {r['batch']:3d}: lenserve {r['lenserve_tok_s']} tok/s" + (f", HF {r['hf_tok_s']} tok/s, {r['speedup_vs_hf']}x" if "hf_tok_s" in r else ""))
    if v.get("throughput") is not None:
        lines.append(f"  HF: {v['hf']}; targets (>=10x at 1, >=3x at 256): {v.get('e2e_targets')}")
    for tool in ("memcheck", "racecheck"):
        s = v.get(tool)
        lines.append(f"  {tool}: " + ("not run" if s is None else ("clean" if s["clean"] else f"{s['errors']} errors (see logs/{tool}.log)")))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print("usage: python -m benchmarks.gpu.summary OUT_DIR", file=sys.stderr)
        return 2
    out = argv[0]
    v = verdicts(out)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(v, f, indent=1)
    print(render(v))
    print(f"  results: {sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, '*.json')))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
