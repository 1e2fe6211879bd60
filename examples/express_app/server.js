// A small Express app for the benchmarks (miehisto issue 6).
//
// Port: --port N (or --port=N), else env PORT, else 8080; listens on
// 127.0.0.1 only. Any GET of / or /health answers 200 with
// `payload=express pid=<pid> requests=<n>`. Handles SIGTERM/SIGINT itself:
// as PID 1 of a PID namespace it would ignore them otherwise.
'use strict';

const express = require('express');

function portFromArgs(argv) {
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--port' && i + 1 < argv.length) return Number(argv[i + 1]);
    if (a.startsWith('--port=')) return Number(a.slice('--port='.length));
  }
  return Number(process.env.PORT || 8080);
}

const port = portFromArgs(process.argv.slice(2));
let requests = 0;

const app = express();
app.disable('x-powered-by');
app.use(express.json());

const router = express.Router();
router.get('/', (req, res) => {
  requests += 1;
  res.type('text/plain').send(`payload=express pid=${process.pid} requests=${requests}\n`);
});
router.get('/health', (req, res) => {
  requests += 1;
  res.type('text/plain').send(`payload=express pid=${process.pid} requests=${requests}\n`);
});
router.get('/items/:n', (req, res) => {
  requests += 1;
  const n = Number(req.params.n);
  res.json({ item: n, square: n * n });
});
app.use(router);

function log(line) {
  process.stdout.write(`MHLOG express ${line}\n`);
}

log(`start pid=${process.pid} ppid=${process.ppid}`);
const server = app.listen(port, '127.0.0.1', () => {
  log(`listen port=${server.address().port}`);
  log('serving');
});
server.on('error', (e) => {
  log(`fatal listen failed ${e.code}`);
  process.exit(3);
});

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    log(`exit signal=${sig}`);
    process.exit(128 + (sig === 'SIGTERM' ? 15 : 2));
  });
}
