"""mod_native_limits' admin-shell commands on Prosody 0.12 (the shell's shared env table): present while any host
runs the module, gone once the last one unloads it, back after a load, and acting on every host or one."""

from test_limits_helpers import ANON_HOST, MUC_HOST, limits_server


def test_commands_follow_the_module_on_0_12(prosody_factory):
    srv = limits_server(prosody_factory, muc=True)
    out = srv.shell("limits:top(3)")
    assert f"{ANON_HOST}: 0 offender(s)" in out and f"{MUC_HOST}: 0 offender(s)" in out, out
    assert "on 1 host(s)" in srv.shell(f'limits:ban("192.0.2.0/24", "1h", "{MUC_HOST}")')
    out = srv.shell("limits:top(3)")
    assert f"{ANON_HOST}: 0 offender(s)" in out and f"{MUC_HOST}: 1 offender(s)" in out, out
    srv.shell(f'module:unload("native_limits", "{ANON_HOST}")')
    out = srv.shell("limits:top(3)")
    assert ANON_HOST + ":" not in out.replace(MUC_HOST, "") and f"{MUC_HOST}: 1 offender(s)" in out, out
    srv.shell(f'module:unload("native_limits", "{MUC_HOST}")')
    res = srv.prosodyctl("shell", "limits:top(3)", check=False)
    text = (res.stdout + res.stderr).decode(errors="replace")
    assert "OK: Listed" not in text and "limits" in text, text  # "attempt to index a nil value (global 'limits')"
    srv.shell(f'module:load("native_limits", "{ANON_HOST}")')
    assert f"{ANON_HOST}: 0 offender(s)" in srv.shell("limits:top(3)")
