"""What machine a benchmark ran on: every bench_*.py reports it beside its figures (CPUs differ: AMD Zen 3
AVX2 and Intel Xeon AVX-512/AMX machines share one kind here, so figures are compared within one run)."""
import os
import platform


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (as lscpu shows it), e.g. 'Intel(R) Xeon(R) Processor'."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
  """The vector/matrix extensions that decide XLA's CPU code: avx2, avx512*, amx*."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('flags'):
          return sorted(x for x in line.split(':', 1)[1].split() if x.startswith(('avx2', 'avx512', 'amx')))
  except OSError:
    pass
  return []


def load_average() -> float:
  return round(os.getloadavg()[0], 2)


def run_pinned(script: str, cores: int, payload: dict) -> tuple[dict | None, str]:
  """Runs `python script --child JSON(payload)` pinned to the first `cores` CPUs (taskset) with XLA's dots on
  that many threads and the repository on PYTHONPATH; returns (the JSON its last stdout line holds, '') or
  (None, the tail of its stderr) when it fails. XLA sizes its thread pool from the affinity mask, so pinning is
  what sets the thread count (`intra_op_parallelism_threads` is no XLA flag)."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS='cpu', OMP_NUM_THREADS=str(cores),
             XLA_FLAGS=f'--xla_cpu_multi_thread_eigen={"true" if cores > 1 else "false"}',
             PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get('PYTHONPATH', '')) if p))
  cmd = ['taskset', '-c', ','.join(str(i) for i in range(cores)), sys.executable, script, '--child',
         json.dumps(payload)]
  done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if done.returncode:
    return None, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1]), ''
