r"""Serve a fine-tuned bundle over REST + WebSocket (natron.serve.app).

  python launch.py --config=configs/serve.py --workdir=runs/demo                 # runs/demo/finetune/bundle
  python launch.py --config=configs/serve.py --workdir=runs/demo --config.port=8000 --config.api_key=SECRET
  python launch.py --config=configs/serve.py --workdir=x --config.bundle=path/to/bundle --config.ws_port=0

Binds 127.0.0.1 (this machine only) unless --config.host=0.0.0.0. HTTP on `port` (GET /health, GET /model_info,
POST /predict, POST /batch_predict, WS /ws); the same app also listens on `ws_port` (default 8765) for the
seed's standalone ws://localhost:8765 WebSocket clients (0 turns that second socket off). API docs at /docs.

--config.exported=DIR/export (written by configs/export.py for the same bundle) calls its natron.jax and loads
its compiled executables for this machine (seconds) instead of tracing and compiling (refused if it was exported
from another model or for another backend; executables compiled on another kind of CPU, jaxlib or XLA options
are not loaded: those buckets compile, and the log says why).

Expected start-up on 2 CPU cores: the sockets answer at once (GET /health: 503 {"status": "starting"} with
Retry-After, then 200 "ok"); the model is ready in seconds with --config.exported (its executables), else
after minutes the first time (the feature graph is compiled once per batch bucket and for the series chunk)
and seconds on later starts (compiled executables are reused from workdir/serve/jax_cache). A missing bundle is a `natron: error:` before anything listens.
Expected latency (experiments/bench_serve.py; figures in the README): /predict of required_candles candles a
few ms at the quick model size, tens of ms at the seed's size (d_model 256, 6 layers) on this CPU.
"""
import ml_collections

from configs import base


def section(quick: bool = False) -> ml_collections.ConfigDict:
  """The serve keys (they live at the top level of the config: --config.port=8000)."""
  del quick   # serving has no quick variant: the bundle decides the model size
  serve = ml_collections.ConfigDict()
  serve.bundle = ''              # '' -> workdir/finetune/bundle
  serve.host = '127.0.0.1'       # a non-loopback address (0.0.0.0) is refused without an API key
  serve.port = 8000
  serve.ws_port = 8765           # second listening socket for ws://HOST:8765/ (0: off)
  # The API key (X-API-Key: KEY or Authorization: Bearer KEY; '' everywhere -> no auth), from the first set of:
  # api_key (works, but warns: visible in the process list), api_key_file (a file of mode 0600), or the
  # NATRON_API_KEY environment variable. Never written to config.json (launch.py redacts it) nor logged.
  serve.api_key = ''
  serve.api_key_file = ''
  serve.max_candles = 5000       # candles per window (>= the model's required_candles)
  serve.max_batch = 256          # windows per /batch_predict request
  serve.max_series = 10_000      # candles of one /batch_predict series
  serve.max_symbols = 64         # streamed symbols per WebSocket connection
  # WebSocket connections open at once (both sockets together); one more is closed at once with code 1013
  # (try again later). A connection holds at most max_symbols x required_candles x 48 bytes of history
  # (natron.serve.ws.session_bytes_bound: 3 MB at 64 x 1016 bars, the test model); measured ~3.4 MB held, 4-6 MB resident per
  # such connection (tests/test_serve_ws.py).
  serve.max_connections = 256
  # Longest gap a streamed `bar` may follow the previous one by (a whole number of the timeframe inferred at
  # subscribe: a closed market, stated as "gap_bars"); longer is refused as 'stale'. 96 h covers a weekend
  # plus a one-day holiday; sessions differ per broker.
  serve.max_gap_hours = 96.0
  # The server listens at once and loads the model in the background (/health: 503 'starting'). If loading
  # fails, /health reports 'failed' with the reason for this many seconds, then the process exits non-zero
  # (`natron: error: ...`, status 2, when the cause is a user error such as a wrong --config.exported).
  serve.failed_exit_s = 10.0
  # Body limits, enforced before a body is decoded (413). 0 -> 256 bytes per candle + 4096: /predict
  # max_candles candles (1.3 MB at 5000), /batch_predict min(max_batch_candles, max(max_series, max_batch *
  # max_candles)) candles (12.8 MB), both capped by max_body_bytes (also the limit of any other route); a
  # limit set explicitly is used as given.
  serve.max_body_bytes = 16 << 20
  serve.predict_body_bytes = 0
  serve.batch_body_bytes = 0
  # Host header names and browser/WebSocket Origin hosts accepted, any port ('*': any). Loopback only by
  # default: a web page the trader opens cannot drive the server (DNS rebinding, cross-site WebSocket hijack).
  serve.allowed_hosts = 'localhost,127.0.0.1,[::1]'
  serve.allowed_origins = 'localhost,127.0.0.1,[::1]'
  serve.batch_wait_ms = 1.0      # max wait for concurrent requests to share one model call
  serve.buckets = (1, 8, 32, 128)  # batch sizes compiled at start-up; requests are padded to one
  serve.threshold = -1.0         # signal threshold; < 0 -> the bundle's thresholds.signal
  serve.compilation_cache_dir = 'auto'  # JAX persistent cache; 'auto': workdir/serve/jax_cache, '': off
  serve.exported = ''            # a DIR/export of configs/export.py: its natron.jax + executables (no compile)
  # Backpressure (natron/serve/guard.py LoopBacklog, batcher.py). A request that cannot be answered by its
  # deadline (counted from its arrival: the parsing queued ahead of it, then the model queue) is 503 with
  # Retry-After (seconds) at once; so is one that would queue more than max_queue windows for the model, or
  # that arrives while request bodies being read already hold max_inflight_body_bytes (at least the largest
  # body limit). Work for a client that disconnected is skipped.
  serve.request_timeout_ms = 1500.0   # /predict and WebSocket requests (answered before the EA's 2 s timeout)
  serve.batch_timeout_ms = 30_000.0   # /batch_predict requests
  serve.max_queue = 1024              # windows (series bars) waiting for the model
  serve.max_batch_candles = 50_000    # candles in one /batch_predict request, all windows together
  serve.max_inflight_body_bytes = 32 << 20
  serve.log_level = 'warning'
  serve.access_log = False
  return serve


def get_config(arg=None):
  args = base.parse_arg(arg)
  config = base.get_base_config()
  config.phase = 'serve'
  config.update(section(args.quick))
  return config
