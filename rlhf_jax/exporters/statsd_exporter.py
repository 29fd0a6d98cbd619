"""DogStatsD over UDP: gauges, alert counts and alert events for a Datadog agent.

No client library: each metrics line is sent as DogStatsD datagrams (lines joined by "\\n",
each datagram at most MAX_DATAGRAM bytes) to host:port, tagged `run:<workdir basename>` and
`stage:<trainer>`:

  rlhf_jax.<metric>:<value>|g|#run:...,stage:...   a gauge per finite numeric metric
                                    ("eval/gold_reward" -> rlhf_jax.eval.gold_reward)
  rlhf_jax.step:<step>|g|#...
  rlhf_jax.alerts:1|c|#...,rule:<rule>,severity:<severity>   per alert
  _e{..}:<title>|<message>|t:<warning|error|info>|#...       per alert, a Datadog event

UDP is fire-and-forget: nothing waits for (or notices) an absent agent.
"""

from __future__ import annotations

import math
import re
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from rlhf_jax import config_spec as cs
from rlhf_jax.exporters import base

# Datadog's advice for UDP: datagrams that fit one Ethernet frame are never fragmented.
MAX_DATAGRAM = 1432
ALERT_TYPES = {"info": "info", "warning": "warning", "critical": "error"}


def metric_name(key: str) -> str:
  """The StatsD name of a line's metric: "eval/gold_reward" -> rlhf_jax.eval.gold_reward."""
  return f"{base.NAMESPACE}.{base.sanitize(key, '.')}"


def tag(value: str) -> str:
  """A tag value: DogStatsD's separators (, | # and newlines) and spaces become "_"."""
  return re.sub(r"[,|#\s]+", "_", str(value)) or "none"


def datagrams(lines: Iterable[str], limit: int = MAX_DATAGRAM) -> list[bytes]:
  """The lines packed into as few newline-joined datagrams of at most `limit` bytes as
  possible (a longer single line is sent alone)."""
  out, current = [], b""
  for line in lines:
    data = line.encode("utf-8")
    if current and len(current) + 1 + len(data) > limit:
      out.append(current)
      current = b""
    current = current + b"\n" + data if current else data
  if current:
    out.append(current)
  return out


class StatsdExporter(base.Exporter):
  """Sends the run's metrics and alerts to a DogStatsD agent (see the module docstring).

  Args:
    context: the run (`base.Context`).
    host, port: the agent's UDP address (the agent listens on 127.0.0.1:8125 by default).
    key: the config key, for errors ("config.exporters.statsd").
  """

  name = "statsd"

  def __init__(
    self,
    context: base.Context,
    *,
    host: str = "127.0.0.1",
    port: int = 8125,
    key: str = "config.exporters.statsd",
  ):
    try:
      family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    except OSError as error:
      raise cs.ConfigError(f"{key}.host={host!r}: cannot resolve it ({error}).") from None
    self.address = address
    self._socket = socket.socket(family, socket.SOCK_DGRAM)
    self.tags = f"run:{tag(context.run)},stage:{tag(context.stage)}"
    step = f"{base.NAMESPACE}.step"
    self._names = base.Names("DogStatsD", metric_name, {step, f"{base.NAMESPACE}.alerts"})

  def _send(self, lines: Iterable[str]) -> None:
    for datagram in datagrams(lines):
      self._socket.sendto(datagram, self.address)

  def write(self, step: int, line: Mapping[str, Any]) -> None:
    lines = [f"{base.NAMESPACE}.step:{int(step)}|g|#{self.tags}"]
    for name, _, value in self._names.items(line):
      if math.isfinite(value):  # StatsD has no NaN
        lines.append(f"{name}:{value:.10g}|g|#{self.tags}")
    self._send(lines)

  def alerts(self, alerts: Iterable[Any]) -> None:
    lines = []
    for a in map(base.alert_dict, alerts):
      tags = f"{self.tags},rule:{tag(a['rule'])},severity:{tag(a['severity'])}"
      lines.append(f"{base.NAMESPACE}.alerts:1|c|#{tags}")
      title = f"rlhf_jax alert {a['rule']} ({a['severity']})"
      text = (a["message"] or title).replace("\n", "\\n")
      alert_type = ALERT_TYPES.get(a["severity"], "warning")
      size = f"{len(title.encode('utf-8'))},{len(text.encode('utf-8'))}"
      lines.append(f"_e{{{size}}}:{title}|{text}|t:{alert_type}|#{tags}")
    self._send(lines)

  def close(self) -> None:
    self._socket.close()
