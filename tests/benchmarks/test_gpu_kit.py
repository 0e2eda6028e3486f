"""The GPU kit's own rules, cheaply: the stage limits fit the device's 9 minutes, the script parses, the helper
turns a junit report into JSON lines and finds missing or broken result files. (The kit itself runs in CI
as ``bash benchmarks/gpu_check.sh --dry-run``; see scripts/test.sh.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys

from helpers import ROOT as REPO

KIT = REPO / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "benchmarks"))  # the kit's own module (benchmarks/ is no package)

import gpu_kit  # noqa: E402

#: The device runs one command for at most 10 minutes; the kit promises 9 in the worst case.
WORST_CASE_S = 540


def test_stage_limits_and_kill_graces_add_up_to_at_most_nine_minutes():
    text = KIT.read_text()
    limits = {k: int(v) for k, v in re.findall(r"^(LIMIT_[A-Z]+)=(\d+)", text, flags=re.M)}
    grace = int(re.search(r"^GRACE=(\d+)", text, flags=re.M).group(1))
    assert set(limits) == {"LIMIT_BUILD", "LIMIT_TESTS", "LIMIT_CORRECT", "LIMIT_SPEED", "LIMIT_STEP"}, limits
    stages = re.findall(r"^run_stage (\w+) ", text, flags=re.M)
    assert len(stages) == len(limits) == 5
    assert sum(limits.values()) + grace * len(stages) <= WORST_CASE_S, (limits, grace)


def test_script_parses_and_names_every_result_file():
    r = subprocess.run(["bash", "-n", str(KIT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = KIT.read_text()
    for name in gpu_kit.RESULT_FILES:
        assert name in text, f"{name} is not written by the kit"
    assert len(gpu_kit.RESULT_FILES) <= 8  # the device returns at most 8 files


def test_tests_report_and_summary(tmp_path):
    xml = tmp_path / "tests.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.ops.a" name="t_ok" time="0.5"/>'
        '<testcase classname="tests.ops.a" name="t_bad" time="1.5"><failure message="boom">trace</failure></testcase>'
        '<testcase classname="tests.ops.b" name="t_skip" time="0"><skipped message="no gpu"/></testcase>'
        "</testsuite></testsuites>"
    )
    out = tmp_path / "tests.jsonl"
    assert gpu_kit.tests_report(str(xml), str(out)) == 1  # one failure
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    counts = next(r for r in rows if r["what"] == "counts")
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["tests"]) == (1, 1, 1, 3)
    assert any(r["what"] == "failure" and r["test"] == "tests.ops.a::t_bad" for r in rows)

    for name in gpu_kit.RESULT_FILES:
        if name not in ("tests.xml", "tests.jsonl"):
            (tmp_path / name).write_text(json.dumps({"stage": "x", "rc": 0, "seconds": 1, "limit_s": 2}) + "\n")
    assert gpu_kit.summary(str(tmp_path)) == 0
    (tmp_path / "speed.jsonl").write_text("{not json\n")
    (tmp_path / "extra.txt").write_text("")
    assert gpu_kit.summary(str(tmp_path)) == 1
    last = json.loads((tmp_path / "summary.jsonl").read_text().splitlines()[-1])
    assert not last["ok"] and any("speed.jsonl" in p for p in last["problems"])
    assert any("extra.txt" in p for p in last["problems"])
