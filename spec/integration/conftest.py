"""pytest glue for the integration specs: Prosody fixtures, log dump on failure, sanitizer checks.

Fixtures
  prosody_factory   function-scoped factory: prosody_factory(storage=..., global_options=..., host_options=...,
                    muc_options=..., modules=..., users=[...]) -> started harness.ProsodyServer (stopped and removed
                    at teardown). Call it several times for several servers.
  module_prosody    module-scoped factory with the same signature, for a server shared by a spec module.

On a failed test, the tail of every live server's log (PN_LOG_LINES lines, default 400) and its stdout are attached
to the report. Sanitizer reports in any server log/stderr or lua5.4 child output fail the test that saw them.
"""

import os

import pytest

import harness


def _tail(text, n):
    lines = text.splitlines()
    if len(lines) > n:
        return f"[... {len(lines) - n} earlier lines; full log in the file named above ...]\n" + "\n".join(lines[-n:])
    return text


def _new_sanitizer_reports(item):
    found = []
    for srv in list(harness.SERVERS) + [s for s in getattr(item, "_pn_stopped_servers", []) if s not in harness.SERVERS]:
        reports = srv.sanitizer_reports()
        seen = getattr(srv, "_sanitizer_seen", 0)
        if len(reports) > seen:
            found += [f"{srv.name}: {line}" for line in reports[seen:]]
            srv._sanitizer_seen = len(reports)
    for entry in list(harness.CHILD_OUTPUTS):
        text = entry.read_text(errors="replace") if hasattr(entry, "read_text") else str(entry)
        found += [f"lua child: {line}" for line in harness.sanitizer_reports(text)]
    harness.CHILD_OUTPUTS.clear()
    return found


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when in ("call", "teardown"):
        reports = _new_sanitizer_reports(item)
        if reports and not rep.failed:
            rep.outcome = "failed"
            rep.longrepr = "sanitizer reports:\n" + "\n".join(reports)
        elif reports:
            rep.sections.append(("sanitizer reports", "\n".join(reports)))
    if rep.failed:
        n = int(os.environ.get("PN_LOG_LINES", "400"))
        stopped = [s for s in getattr(item, "_pn_stopped_servers", []) if s not in harness.SERVERS]
        for srv in list(harness.SERVERS) + stopped:
            rep.sections.append((f"prosody log {srv.name} ({srv.log_path})", _tail(srv.log_text(), n)))
            out = srv.stdout_text()
            if out.strip():
                rep.sections.append((f"prosody stdout/stderr {srv.name} ({srv.stdout_path})", _tail(out, n)))


def _factory(request, servers):
    def start(**kwargs):
        kwargs.setdefault("name", request.node.name[:40].replace("/", "_").replace("[", "_").replace("]", ""))
        srv = harness.ProsodyServer(**kwargs)
        servers.append(srv)
        srv.start()
        return srv
    return start


@pytest.fixture
def prosody_factory(request):
    servers = []
    yield _factory(request, servers)
    for srv in servers:
        srv.stop()
    # keep the stopped servers reachable for the failure report of this test's teardown
    request.node._pn_stopped_servers = servers
    for srv in servers:
        if srv in harness.SERVERS:
            harness.SERVERS.remove(srv)


@pytest.fixture(scope="module")
def module_prosody(request):
    servers = []
    yield _factory(request, servers)
    for srv in servers:
        srv.stop()
        reports = srv.sanitizer_reports()[getattr(srv, "_sanitizer_seen", 0):]
        srv.cleanup()
        if reports:
            pytest.fail("sanitizer reports at shutdown:\n" + "\n".join(reports))


def pytest_sessionfinish(session, exitstatus):
    # Servers of function-scoped factories are kept until here so their logs can be printed; remove them now.
    if os.environ.get("PN_KEEP_TMP"):
        return
    import shutil
    for item in session.items:
        for srv in getattr(item, "_pn_stopped_servers", []):
            shutil.rmtree(srv.tmp, ignore_errors=True)
