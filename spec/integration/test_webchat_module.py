"""mod_native_webchat on its own: options, errors, the default room, on throwaway servers (no browser).

The whole webchat in a browser is test_webchat.py; here each case is a small server from the harness, with the
module on its VirtualHost "localhost" made anonymous.
"""

import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request

import harness

REPO = harness.REPO


def converse_dir():
    res = subprocess.run(["sh", str(REPO / "demo" / "fetch-converse")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def webchat_server(factory, tmp_path=None, global_options=None, **webchat):
    host = {"authentication": "anonymous", "webchat_room": "support@conference.localhost"}
    host.update(webchat)
    g = {"http_default_host": "localhost"}
    g.update(global_options or {})
    srv = factory(modules=["http"], host_modules=["native_webchat"], host_options=host, global_options=g)
    return wait_http(srv)


def wait_http(srv, timeout=60):
    """The harness waits for the c2s port; HTTP may open a moment later."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", srv.http_port), timeout=1):
                return srv
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def get(srv, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.http_port}{path}", timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def room_state(srv, room):
    return srv.shell_result(f'local r = prosody.hosts["conference.localhost"].modules.muc.get_room_from_jid("{room}"); '
                            'return r and table.concat({tostring(r:get_persistent()), tostring(r:get_public()), '
                            'tostring(r._data.archiving), tostring(r:get_name())}, ",") or "none"')


def test_page_config_follows_http_paths_and_the_room_option(prosody_factory):
    srv = webchat_server(prosody_factory, webchat_room="Help@Conference.localhost", webchat_converse_dir=converse_dir(),
                         global_options={"http_paths": {"native_webchat": "/webchat", "websocket": "/ws",
                                                        "bosh": "/bosh"}},
                         webchat_title="Help <desk>")
    status, page = get(srv, "/webchat/")
    assert status == 200
    config = json.loads(re.search(r'id="webchat-config">(.*?)</script>', page).group(1))
    assert config == {"anonymous_host": "localhost", "muc_host": "conference.localhost",
                      "default_room": "help@conference.localhost", "websocket_path": "/ws", "bosh_path": "/bosh"}
    assert "<title>Help &lt;desk&gt;</title>" in page
    assert get(srv, "/chat/")[0] == 404
    assert get(srv, "/webchat/dist/converse.min.css")[0] == 200
    # The room named by the option (nodeprep'd) was created: persistent, public, archived.
    assert room_state(srv, "help@conference.localhost") == "true,true,true,Support"


def test_without_converse_the_page_says_so_and_the_log_says_why(prosody_factory, tmp_path):
    srv = webchat_server(prosody_factory, webchat_converse_dir=str(tmp_path / "nowhere"))
    status, page = get(srv, "/chat/")
    assert status == 503 and "converse.js is missing" in page
    assert get(srv, "/chat/dist/converse.min.js")[0] == 404
    assert re.search(r"native_webchat\terror\tconverse\.js not found: webchat_converse_dir \(.*nowhere\)", srv.log_text())


def test_a_webchat_room_that_is_not_a_room_address_disables_the_module(prosody_factory):
    for bad in ("support", "support@conference.localhost/nick"):
        srv = webchat_server(prosody_factory, webchat_room=bad, webchat_converse_dir=converse_dir())
        assert get(srv, "/chat/")[0] == 404
        assert "webchat_room must be a room address like support@conference.localhost" in srv.log_text()
        srv.stop()


def test_an_existing_room_is_left_as_it_is_and_ensure_can_be_turned_off(prosody_factory):
    srv = webchat_server(prosody_factory, webchat_converse_dir=converse_dir(), webchat_ensure_room=False)
    assert room_state(srv, "support@conference.localhost") == "none"
    # An admin makes the room, not public, under another name; enabling the option later keeps it so.
    srv.shell_result('local muc = prosody.hosts["conference.localhost"].modules.muc; '
                     'local r = muc.create_room("support@conference.localhost"); r:set_persistent(true); '
                     'r:set_public(false); r:set_name("Staff"); r:save(true); return "made"')
    srv.host_options["webchat_ensure_room"] = True
    srv.write_config()
    wait_http(srv.restart())
    assert room_state(srv, "support@conference.localhost").startswith("true,false,")
    assert room_state(srv, "support@conference.localhost").endswith(",Staff")
    assert "Created the persistent, archived room" not in srv.log_text()
