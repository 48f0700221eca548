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
