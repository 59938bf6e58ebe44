"""mod_native_limits: the stanza escalation over WebSocket and BOSH, as test_limits_c2s checks it over plain TCP.
A session over its budget is delayed (every stanza still answered), then refused (wait/policy-violation), then
closed, and the close is a strike that bans its address: the next stream from that address is refused at once,
another network behind the same proxy is not. Clients come through 127.0.0.1 acting as a trusted reverse proxy
with X-Forwarded-For, so each has its own address while the loopback exemption stays on.
"""

import re

import pytest

from test_limits_helpers import (BOSH_NS, Bosh, WebSocketXMPP, bosh, bosh_session_request, decisions,
                                 expect_stream_error, limits_server, ws_login_bind)

PING = "<iq xmlns='jabber:client' type='get' id='{id}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"


def reply_pattern(stanza_id):
    return r"<iq[^>]*id=['\"]%s['\"][^>]*(?:/>|>.*?</iq>)" % stanza_id


class WebSocketClient:
    """Sends stanzas one WebSocket message each (RFC 7395) and reads until a pattern or the stream's end."""

    def __init__(self, srv, xff):
        self.ws = ws_login_bind(srv, xff)

    def send_until(self, stanzas, pattern):
        for s in stanzas:
            self.ws.send(s)
        try:
            return self.ws.recv_until(pattern + r"|</stream:error>|<close ")
        except (ConnectionError, OSError) as e:
            return f"closed: {e}"

    def close(self):
        self.ws.close()


class BoshClient:
    """Sends stanzas in one BOSH body and polls until a pattern or the session's end."""

    def __init__(self, srv, xff):
        self.bosh = Bosh(srv, xff)

    def send_until(self, stanzas, pattern):
        return self.bosh.body_until("".join(stanzas), pattern)

    def close(self):
        pass


CLIENTS = {"websocket": WebSocketClient, "bosh": BoshClient}


def opened(srv, transport, xff):
    """A new stream from `xff`: -> "ok" once SASL ANONYMOUS succeeds, else the text that refused it."""
    if transport == "websocket":
        ws = WebSocketXMPP(srv, xff=xff)
        try:
            kind, text = ws.anon_login()
        finally:
            ws.close()
        return "ok" if kind == "success" else text
    text = bosh(srv, bosh_session_request(9000), xff)
    sid = re.search(r"sid=['\"]([^'\"]+)", text)
    if not sid or "type='terminate'" in text:
        return text
    text = bosh(srv, f"<body rid='9001' sid='{sid.group(1)}' xmlns='{BOSH_NS}'>"
                     "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='ANONYMOUS'/></body>", xff)
    return "ok" if "<success" in text else text


def server(prosody_factory, **options):
    host_options = {"native_limits_stanzas": False, "native_limits_max_delay": 0}
    host_options.update(options)
    return limits_server(prosody_factory, modules=["websocket", "bosh"], exempt_loopback=True,
                         host_options=host_options)


@pytest.mark.parametrize("transport", ["websocket", "bosh"])
def test_stanza_delay_answers_everything(prosody_factory, transport):
    srv = server(prosody_factory, native_limits_session_stanzas="4/s burst 1", native_limits_max_delay=2)
    c = CLIENTS[transport](srv, "198.51.100.30")
    text = c.send_until([PING.format(id=f"d{i}") for i in range(6)], reply_pattern("d5"))
    assert len(re.findall(r"type=['\"]result['\"]", text)) == 6, text
    assert "policy-violation" not in text
    assert decisions(srv, "session_stanzas", "delay") >= 4  # one token in hand, then 0.25 s apart
    assert decisions(srv, "session_stanzas", "refuse") == 0
    c.close()


@pytest.mark.parametrize("transport", ["websocket", "bosh"])
def test_stanza_refuse_close_then_ban(prosody_factory, transport):
    srv = server(prosody_factory, native_limits_session_stanzas="1/10min burst 5", native_limits_stanza_close_after=3,
                 native_limits_ban_strikes=1, native_limits_ban_initial=300)
    abuser = "198.51.100.40"
    c = CLIENTS[transport](srv, abuser)
    replies = []
    for i in range(12):
        text = c.send_until([PING.format(id=f"p{i}")], reply_pattern(f"p{i}"))
        replies.append(text)
        if not re.search(reply_pattern(f"p{i}"), text):
            break
    results = [r for r in replies if re.search(r"type=['\"]result['\"]", r)]
    refused = [r for r in replies if "<policy-violation" in r and re.search(reply_pattern(r"p\d+"), r)]
    assert len(results) == 5, replies  # the burst
    assert len(refused) == 2, replies  # refused twice, closed on the third
    assert "You are sending too fast; slow down" in refused[0]
    expect_stream_error(replies[-1], contains="Too many stanzas; slow down")
    c.close()
    assert decisions(srv, "session_stanzas", "refuse") == 3
    assert decisions(srv, "session_stanzas", "close") == 1
    # the close was a strike, and one strike bans (native_limits_ban_strikes = 1; with one banned address its
    # /24 has as many): the address is refused at its next stream, another network behind the proxy is not
    assert "banned" in srv.shell(f'limits:show("{abuser}")')
    expect_stream_error(opened(srv, transport, abuser), contains="try again in 300 seconds")
    assert opened(srv, transport, "203.0.113.41") == "ok"


@pytest.mark.parametrize("transport", ["websocket", "bosh"])
def test_a_delayed_stream_open_succeeds(prosody_factory, transport):
    srv = server(prosody_factory, native_limits_connections={"address": "1/s burst 1", "ipv4/24": False,
                                                             "ipv6/64": False, "ipv6/48": False, "global": False},
                 native_limits_max_delay=2)
    assert opened(srv, transport, "198.51.100.50") == "ok"
    assert opened(srv, transport, "198.51.100.50") == "ok"  # within a second: the next slot, not a refusal
    assert decisions(srv, "connections", "refuse") == 0
    assert "Traceback" not in srv.log_text() and "unexpected async state" not in srv.log_text()
