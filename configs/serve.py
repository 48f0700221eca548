r"""Serve a fine-tuned bundle over REST + WebSocket (natron.serve.app).

  python launch.py --config=configs/serve.py --workdir=runs/demo                 # runs/demo/finetune/bundle
  python launch.py --config=configs/serve.py --workdir=runs/demo --config.port=8000 --config.api_key=SECRET
  python launch.py --config=configs/serve.py --workdir=x --config.bundle=path/to/bundle --config.ws_port=0

Binds 127.0.0.1 (this machine only) unless --config.host=0.0.0.0. HTTP on `port` (GET /health, GET /model_info,
POST /predict, POST /batch_predict, WS /ws); the same app also listens on `ws_port` (default 8765) for the
seed's standalone ws://localhost:8765 WebSocket clients (0 turns that second socket off). API docs at /docs.

--config.exported=DIR/export (written by configs/export.py for the same bundle) calls its natron.jax instead of
tracing the feature graph at start-up (refused if it was exported from another model or for another backend).

Expected start-up on 2 CPU cores: minutes the first time (the feature graph is compiled once per batch bucket
and for the series chunk), seconds on later starts (compiled executables are reused from workdir/serve/jax_cache).
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
  # Body limits, enforced before a body is decoded (413). 0 -> 256 bytes per candle + 4096: /predict
  # max_candles candles (1.3 MB at 5000), /batch_predict max(max_series, max_batch * max_candles) candles,
  # both capped by max_body_bytes (also the limit of any other route).
  serve.max_body_bytes = 64 << 20
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
  serve.exported = ''            # a DIR/export of configs/export.py: call its natron.jax instead of tracing
  serve.log_level = 'warning'
  serve.access_log = False
  return serve


def get_config(arg=None):
  args = base.parse_arg(arg)
  config = base.get_base_config()
  config.phase = 'serve'
  config.update(section(args.quick))
  return config
