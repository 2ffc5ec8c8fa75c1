"""The benchmark's results as data: the plan of a run, and one row of numbers per setup.

Shared by the driver (`run.py`, which fills them) and the report (`report.py`, which renders
them), so neither imports the other.
"""

import dataclasses
import os

CLK_TCK = os.sysconf("SC_CLK_TCK")
WRK_THREADS = 2           # one per core; the load generator shares the cores with everything else
LATENCY_CONNECTIONS = 32  # oha's connections for the fixed-rate phases


@dataclasses.dataclass(frozen=True)
class Plan:
    """How long each phase runs."""

    warmup_s: int
    saturation_s: int
    rate_s: int
    connections: tuple
    load_fractions: tuple   # offered rates, as fractions of A's throughput at 32 connections
    memory_keys: int        # distinct keys for E's Redis memory phase
    single_requests: int = 2000   # the one-client phase's sequential requests
    accuracy_windows: int = 10    # the accuracy phase's whole windows (1 s each)
    accuracy_limit: int = 300     # its rule's limit per window (offered: 4 times as much)


FULL = Plan(warmup_s=1, saturation_s=5, rate_s=5, connections=(32, 128), load_fractions=(0.1, 0.25, 0.35, 0.5, 0.75),
            memory_keys=10_000)
QUICK = Plan(warmup_s=1, saturation_s=1, rate_s=1, connections=(32, 128), load_fractions=(0.5,), memory_keys=1_000,
             single_requests=300, accuracy_windows=4)


# --- Results ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Latency:
    offered: float
    achieved: float
    p50: float   # milliseconds
    p90: float
    p99: float
    p999: float
    statuses: dict
    errors: int


@dataclasses.dataclass
class Row:
    """One setup's numbers."""

    key: str
    name: str
    base: str                                               # the row its ratios are against
    rps: dict = dataclasses.field(default_factory=dict)     # connections -> req/s
    # A only: connections -> the better of its run at the start and its run at the end, the
    # baseline of every ratio (a depressed first run of A must not flatter the setups).
    base_rps: dict = dataclasses.field(default_factory=dict)
    latency: dict = dataclasses.field(default_factory=dict)  # load fraction -> Latency
    cpu_ticks: dict = dataclasses.field(default_factory=dict)  # role -> clock ticks
    requests: int = 0                                       # completed in the measured phases
    statuses: dict = dataclasses.field(default_factory=dict)  # "2xx", "non-2xx", "socket errors" -> n
    rss_kb: dict = dataclasses.field(default_factory=dict)  # role -> VmHWM
    counters: dict = dataclasses.field(default_factory=dict)  # see counters(): deltas over the phases
    memory_per_key: dict = None
    single: Latency = None                                  # one client, sequential (setup.single)
    # "load": the throughput/latency/cost tables; "accuracy": the accuracy phase (accuracy.py),
    # whose numbers are in `accuracy` (its tally) and whose plugin's leases option is `leases`.
    phase: str = "load"
    accuracy: dict = None
    leases: str = None
    error: str = None
    warning: str = None

    def per_request(self, counter):
        if counter not in self.counters or not self.requests:
            return None
        return self.counters[counter] / self.requests

    def cpu_us_per_request(self, role):
        if role not in self.cpu_ticks or not self.requests:
            return None
        return self.cpu_ticks[role] / CLK_TCK * 1e6 / self.requests
