"""The CPU's name, for the machine lines the benchmarks write."""

from __future__ import annotations


def cpu_name() -> str:
  """The first ``model name`` of /proc/cpuinfo, or '' where there is none."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return ''
