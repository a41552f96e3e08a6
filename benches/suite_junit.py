"""The driver-suite scripts' reading of pytest's junit XML (benches/driver_suites.sh, benches/psycopg_suite.sh).

load(base) reads BASE.xml (the results) and BASE.rc (the run's exit status and seconds); counts() and bad()
summarise what it returns.
"""
import os
import xml.etree.ElementTree as ET

RANK = {"passed": 0, "skipped": 1, "error": 2, "failed": 3}


def load(base, whole_message=True):
    """({test id: (status, message)} or None without results, exit status, seconds). The message of a failure
    is all of pytest's message on one line (up to 400 characters), or with whole_message=False its first line
    (up to 240); without a message, the first line of the traceback."""
    rc, secs = ((open(base + ".rc").read().split() if os.path.exists(base + ".rc") else []) + ["?", "?"])[:2]
    if not os.path.exists(base + ".xml"):
        return None, rc, secs
    res = {}
    for tc in ET.parse(base + ".xml").getroot().iter("testcase"):
        cls = tc.get("classname") or ""  # empty for a collection error: then name is the module
        tid = (f"{cls}::{tc.get('name', '')}" if cls else tc.get("name", "")).removeprefix("tests.")
        status, msg = "passed", ""
        for child in tc:
            kind = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(child.tag)
            if kind and RANK[kind] > RANK[status]:
                if whole_message and child.get("message"):  # all of it, on one line
                    msg = " ".join(l.strip() for l in child.get("message").splitlines() if l.strip())[:400]
                elif whole_message:  # no message: the first line of the traceback
                    msg = next(iter((child.text or "").strip().splitlines()), "")[:400]
                else:
                    lines = (child.get("message") or child.text or "").strip().splitlines()
                    msg = (lines[0] if lines else "")[:240]
                status = kind
        if tid not in res or RANK[status] > RANK[res[tid][0]]:
            res[tid] = (status, msg)
    return res, rc, secs


def counts(res):
    """passed/failed/error/skipped."""
    if res is None:
        return "no results"
    return "/".join(str(sum(1 for s, _ in res.values() if s == k)) for k in ("passed", "failed", "error", "skipped"))


def bad(res, t):
    """Whether test t failed or errored."""
    return res is not None and t in res and res[t][0] in ("failed", "error")
