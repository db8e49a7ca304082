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


def machine_line() -> str:
  """``Machine: CPU, cores, jax version, backend, load average now.``"""
  import os  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  return (f'Machine: {cpu_name()}, {os.cpu_count()} cores, jax '
          f'{jax.__version__}, backend {jax.default_backend()}, load average '
          f'{os.getloadavg()[0]:.1f} at the end.')
