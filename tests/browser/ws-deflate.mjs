// permessage-deflate with Node's `ws` (issue 24): a client that offers it
// (`perMessageDeflate`, compressing everything it sends) and one that does not
// see the same room byte for byte; a compressed message that inflates past the
// limit is closed with 1009. Usage: node ws-deflate.mjs http://127.0.0.1:PORT
import WebSocket from 'ws';

const base = process.argv[2];
const wsBase = base.replace('http:', 'ws:');
const fail = (why) => { console.error(`[ws-deflate] FAIL: ${why}`); process.exit(1); };
setTimeout(() => fail('timed out'), 20000).unref();

const token = async (user, room) => {
  const res = await fetch(`${base}/dev/token?userId=${user}&roomId=${room}`);
  return (await res.json()).token;
};

// Opens a client; resolves with it and the extensions the server answered.
const open = async (user, room, perMessageDeflate) => {
  const ws = new WebSocket(`${wsBase}/?token=${await token(user, room)}`, { perMessageDeflate });
  let extensions = null;
  ws.on('upgrade', (res) => { extensions = res.headers['sec-websocket-extensions'] ?? null; });
  const messages = [];
  ws.on('message', (data) => messages.push(data.toString()));
  await new Promise((resolve, reject) => { ws.on('open', resolve); ws.on('error', reject); });
  return { ws, messages, extensions: () => extensions };
};

// Waits until a message satisfies `pred`; returns it.
const until = async (client, pred) => {
  for (;;) {
    const found = client.messages.find((m) => pred(JSON.parse(m)));
    if (found) return found;
    await new Promise((r) => setTimeout(r, 20));
  }
};

const zoe = await open('zoe', 'ws-deflate', { threshold: 0 });
const pat = await open('pat', 'ws-deflate', false);
if (!/permessage-deflate/.test(zoe.extensions() ?? '')) fail(`zoe got ${zoe.extensions()}`);
if (pat.extensions() !== null) fail(`pat got ${pat.extensions()}`);

const long = '协作白板🎨'.repeat(1000);
zoe.ws.send(JSON.stringify({ type: 'shape_create', shapeType: 'text', x: 1, y: 1, width: 9, height: 9, text: long }));
for (let x = 0; x < 100; x++) {
  zoe.ws.send(JSON.stringify({ type: 'shape_create', shapeType: 'rectangle', x, y: 2, width: 150, height: 100 }));
}
pat.ws.send(JSON.stringify({ type: 'cursor_move', x: 4242, y: 1 }));
const done = (s) => s.shapes.length === 101 && s.cursors.some((c) => c.x === 4242);
const zoeLast = await until(zoe, done);
const patLast = await until(pat, done);
if (zoeLast !== patLast) fail(`states differ: ${zoeLast.length} vs ${patLast.length} bytes`);
if (JSON.parse(zoeLast).shapes[0].text !== long) fail('the long text changed');

const metrics = await (await fetch(`${base}/metrics`)).text();
const metric = (name) => Number((metrics.match(new RegExp(`^${name} (\\S+)$`, 'm')) ?? [])[1] ?? 0);
if (metric('session_server_messages_compressed_total') < 1) fail('nothing was sent compressed');
if (metric('session_server_messages_inflated_total') < 101) fail('zoe\'s messages were not inflated');

// A zip bomb: a few KB compressed, 1 MB inflated.
const bomb = await open('bomb', 'ws-deflate', { threshold: 0 });
const closed = new Promise((resolve) => bomb.ws.on('close', (code) => resolve(code)));
bomb.ws.send(JSON.stringify({ type: 'shape_create', shapeType: 'text', x: 1, y: 1, width: 1, height: 1, text: 'a'.repeat(1_000_000) }));
const code = await closed;
if (code !== 1009) fail(`the bomb was closed with ${code}`);

zoe.ws.close();
pat.ws.close();
console.log(`[ws-deflate] zoe's last snapshot: ${zoeLast.length} bytes; compressed messages sent: ${metric('session_server_messages_compressed_total')}, bytes on the wire: ${metric('session_server_compressed_bytes_total')}`);
console.log('[ws-deflate] pass');
process.exit(0);
