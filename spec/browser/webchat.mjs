// Browser spec of the webchat served by `make demo` (demo/prosody.cfg.lua + mod_native_webchat).
// Debian's Chromium, headless, driven by playwright-core (which downloads no browser).
//
//   node spec/browser/webchat.mjs --base http://127.0.0.1:PORT --out DIR --step STEP [--tokens a,b]
//
// Steps (spec/integration/test_webchat.py runs them against one demo server, in order):
//   support   two anonymous visitors open /chat/, land in the support room, exchange messages
//   fragment  a visitor opens /chat/#other@conference.localhost (and a percent-encoded fragment) and lands there
//   refuse    fragments that are not rooms on this server are refused on the page, with no XMPP session
//   late      a late joiner (after a server restart) sees --tokens in the support room's history
//   flood     a visitor that floods is slowed (its messages refused beyond the room's rate, visibly), then
//             thrown out: its address is banned, the ban closes its session, and a reload shows why
// Each step prints "CHECK ok|fail <name> <detail>" lines and finally "RESULT {json}", saves screenshots
// into --out, and exits 0 only when every check passed.
//
// Environment: PN_CHROMIUM  browser binary (default: Debian's chromium-headless-shell, else chromium).

import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

function args() {
	const out = { tokens: [] };
	const a = process.argv.slice(2);
	for (let i = 0; i < a.length; i += 2) {
		const k = a[i].replace(/^--/, "");
		out[k] = k === "tokens" ? a[i + 1].split(",").filter(Boolean) : a[i + 1];
	}
	for (const k of ["base", "out", "step"]) {
		if (!out[k]) { console.error(`missing --${k}`); process.exit(2); }
	}
	return out;
}

const opts = args();
mkdirSync(opts.out, { recursive: true });

// Generous bounds: they only end a run that has already failed; a slow machine still passes.
const WAIT = 60000;

const checks = [];
function check(name, ok, detail = "") {
	checks.push({ name, ok: !!ok, detail: String(detail) });
	console.log(`CHECK ${ok ? "ok" : "fail"} ${name} ${detail}`.trimEnd());
	return !!ok;
}

function browserPath() {
	const candidates = [process.env.PN_CHROMIUM, "/usr/bin/chromium-headless-shell", "/usr/bin/chromium"].filter(Boolean);
	const found = candidates.find((p) => existsSync(p));
	if (!found) throw new Error("no Chromium: install Debian's chromium-headless-shell (spec/deps.sh)");
	return found;
}

const token = (label) => `${label}-${Math.random().toString(36).slice(2, 10)}`;

// One visitor = one browser context (its own storage, so its own anonymous account).
class Visitor {
	constructor(browser, name) {
		this.browser = browser;
		this.name = name;
		this.sockets = [];
		this.console = [];
		this.errors = [];
	}

	async open(fragment = "") {
		this.context = await this.browser.newContext({ viewport: { width: 1100, height: 700 } });
		this.page = await this.context.newPage();
		this.page.on("websocket", (ws) => this.sockets.push(ws.url()));
		this.page.on("console", (m) => {
			this.console.push(`${m.type()}: ${m.text()}`);
			if (m.type() === "error" && /Content Security Policy|Refused to/.test(m.text())) this.errors.push(m.text());
		});
		this.page.on("pageerror", (e) => this.errors.push(String(e)));
		await this.page.goto(`${opts.base}/chat/${fragment}`);
		return this;
	}

	textarea() { return this.page.locator("textarea.chat-textarea"); }

	// The room this visitor is in, from the chat view Converse rendered (converse-muc carries the room JID).
	async joined() {
		await this.textarea().waitFor({ state: "visible", timeout: WAIT });
		return this.page.evaluate(() => {
			const muc = document.querySelector("converse-muc");
			return muc ? (muc.getAttribute("jid") || muc.model?.get("jid") || "") : "";
		});
	}

	async roomTitle() {
		return (await this.page.locator(".chatbox-title__text, .chat-head__title, .chatroom .chat-head").first().innerText()).trim();
	}

	async nick() {
		return this.page.evaluate(() => document.querySelector("converse-muc")?.model?.get("nick") || "");
	}

	async send(text) {
		await this.textarea().fill(text);
		await this.textarea().press("Enter");
	}

	// Waits until `text` shows in the conversation; true if it did.
	async sees(text, timeout = WAIT) {
		try {
			await this.page.locator(".chat-content .chat-msg__text", { hasText: text }).first()
				.waitFor({ state: "visible", timeout });
			return true;
		} catch (e) {
			return false;
		}
	}

	async shot(file) {
		await this.page.screenshot({ path: join(opts.out, file) });
	}

	async close() { await this.context?.close(); }
}

async function stepSupport(browser) {
	const a = await new Visitor(browser, "A").open();
	const b = await new Visitor(browser, "B").open();
	const roomA = await a.joined();
	const roomB = await b.joined();
	check("visitor A lands in the support room", roomA === "support@conference.localhost", roomA);
	check("visitor B lands in the support room", roomB === "support@conference.localhost", roomB);
	check("the room shows its name", /Support/.test(await a.roomTitle()), await a.roomTitle());
	const nickA = await a.nick();
	const nickB = await b.nick();
	check("anonymous visitors get distinct guest nicknames", /^guest-\d{6}$/.test(nickA) && /^guest-\d{6}$/.test(nickB)
		&& nickA !== nickB, `${nickA} ${nickB}`);
	check("the page talks XMPP over the same-origin WebSocket",
		a.sockets.length > 0 && a.sockets.every((u) => u === opts.base.replace(/^http/, "ws") + "/xmpp-websocket"),
		a.sockets.join(" "));
	await a.shot("01-support-visitor-a-joined.png");

	const t1 = token("hello-from-a");
	await a.send(t1);
	check("B sees A's message", await b.sees(t1), t1);
	check("A sees its own message", await a.sees(t1), t1);
	const t2 = token("reply-from-b");
	await b.send(t2);
	check("A sees B's reply", await a.sees(t2), t2);
	await a.shot("02-support-visitor-a-after-exchange.png");
	await b.shot("03-support-visitor-b-after-exchange.png");
	check("no script or CSP errors on the page", a.errors.length === 0 && b.errors.length === 0,
		[...a.errors, ...b.errors].join(" | "));
	await a.close();
	await b.close();
	return { tokens: [t1, t2] };
}

async function stepFragment(browser) {
	const c = await new Visitor(browser, "C").open("#other@conference.localhost");
	const room = await c.joined();
	check("visitor C lands in the room named in the fragment", room === "other@conference.localhost", room);
	const t = token("in-other");
	await c.send(t);
	check("C can talk in that room", await c.sees(t), t);
	await c.shot("04-fragment-other-room.png");
	await c.close();

	// A bare room name means a room on this server's MUC service.
	const g = await new Visitor(browser, "G").open("#other");
	const room3 = await g.joined();
	check("a bare room name in the fragment is a room on this server", room3 === "other@conference.localhost", room3);
	await g.close();

	// Percent-encoded fragment, as a link from another page or a mail client would carry it.
	const e = await new Visitor(browser, "E").open("#caf%C3%A9-help%40conference.localhost");
	const room2 = await e.joined();
	check("a percent-encoded fragment is decoded", room2 === "café-help@conference.localhost", room2);
	await e.shot("05-fragment-percent-encoded.png");
	await e.close();
	return {};
}

async function stepRefuse(browser) {
	const bad = [
		["#support@conference.example.org", "not a room on this server"],
		["#someone@localhost", "not a room on this server"],
		["#support@conference.localhost/nick", "not a room address"],
		["#%E0%A4%A", "malformed"],
	];
	let n = 0;
	for (const [fragment, why] of bad) {
		n++;
		const v = await new Visitor(browser, `R${n}`).open(fragment);
		const box = v.page.locator("#webchat-refused");
		let shown = false;
		try {
			await box.waitFor({ state: "visible", timeout: WAIT });
			shown = true;
		} catch (e) { /* reported below */ }
		const text = shown ? await box.innerText() : "";
		check(`${fragment} is refused with a visible message`, shown && text.includes(why), text);
		// The page has finished its module scripts once the box shows; give Converse no chance either way.
		await v.page.waitForLoadState("networkidle");
		const chats = await v.page.locator("converse-muc").count();
		check(`${fragment} opens no XMPP session and no room`, v.sockets.length === 0 && chats === 0,
			`${v.sockets.length} websockets, ${chats} rooms`);
		if (n === 1) await v.shot("06-refused-foreign-room.png");
		await v.close();
	}
	return {};
}

async function stepLate(browser) {
	const d = await new Visitor(browser, "D").open();
	const room = await d.joined();
	check("the late joiner lands in the support room", room === "support@conference.localhost", room);
	for (const t of opts.tokens) {
		check(`the late joiner sees earlier message ${t}`, await d.sees(t), t);
	}
	await d.shot("07-late-joiner-history.png");
	await d.close();
	return {};
}

async function stepFlood(browser) {
	const f = await new Visitor(browser, "F").open();
	const room = await f.joined();
	check("the flooder lands in the support room", room === "support@conference.localhost", room);
	const w = await new Visitor(browser, "W").open();
	await w.joined();
	// Send as fast as the page allows until the room has refused 30 messages: three strikes of ten
	// refusals each, which bans the address (mod_native_limits defaults). Bounded by a message count,
	// not by time, so a slow machine floods just as well.
	const run = Math.random().toString(36).slice(2, 8);
	const tooFast = f.page.locator(".chat-msg__error", { hasText: "You are sending messages too fast; slow down" });
	const sent = [];
	let refused = 0; // the most refusals seen at once: the ban replaces the room view
	let firstSeen = false;
	let shot = false;
	while (sent.length < 400) {
		const t = `flood-${run}-${String(sent.length).padStart(3, "0")}`;
		try {
			await f.textarea().fill(t, { timeout: 5000 });
			await f.textarea().press("Enter", { timeout: 5000 });
		} catch (e) {
			break; // the composer went away: the ban has closed the session
		}
		sent.push(t);
		// The watcher shares the flooder's address (everyone is 127.0.0.1 here), so the ban will
		// throw it out too: see the first message arrive while it is still connected.
		if (sent.length === 1) firstSeen = await w.sees(t);
		refused = Math.max(refused, await tooFast.count());
		if (refused >= 10 && !shot) {
			await f.shot("08-flood-refused-messages.png");
			await w.shot("09-flood-watcher.png");
			shot = true;
		}
	}
	// Three strikes of ten refusals each ban the address (mod_native_limits defaults); the
	// server-side count of refusals is checked by test_webchat.py through the metrics.
	check("the flooder is told, visibly, to slow down, message by message", refused >= 10,
		`${refused} refusals seen after ${sent.length} messages`);
	check("the first message of the flood still arrives", firstSeen, sent[0]);
	await w.close();

	// The third strike bans the address, and the ban closes its open sessions at once.
	let closed = false;
	try {
		await f.textarea().waitFor({ state: "hidden", timeout: WAIT });
		closed = true;
	} catch (e) { /* reported below */ }
	check("the ban closes the flooder's session", closed, (await f.page.locator("body").innerText()).replace(/\s+/g, " ").slice(0, 200));

	// The flooder reloads (a fresh anonymous account, the same address): refused by the ban.
	await f.page.reload();
	const banned = f.page.getByText(/You are banned from this service for \d+ more seconds/).first();
	let shown = false;
	try {
		await banned.waitFor({ state: "visible", timeout: WAIT });
		shown = true;
	} catch (e) { /* reported below */ }
	const text = shown ? (await banned.innerText()).replace(/\s+/g, " ") : await f.page.locator("body").innerText();
	check("after the flood, the flooder's address is refused with a visible message", shown, text.slice(0, 200));
	await f.shot("10-flood-banned-on-rejoin.png");
	await f.close();
	return { run, sent: sent.length, refused };
}

const steps = { support: stepSupport, fragment: stepFragment, refuse: stepRefuse, late: stepLate, flood: stepFlood };

let result = {};
let crashed = null;
const browser = await chromium.launch({ executablePath: browserPath(), headless: true });
try {
	if (!steps[opts.step]) throw new Error(`unknown step ${opts.step}`);
	result = await steps[opts.step](browser);
} catch (e) {
	crashed = String(e && e.stack || e);
	check("step ran to the end", false, crashed.split("\n")[0]);
} finally {
	await browser.close();
}
const ok = checks.length > 0 && checks.every((c) => c.ok);
console.log("RESULT " + JSON.stringify({ step: opts.step, ok, checks, ...result }));
process.exit(ok ? 0 : 1);
