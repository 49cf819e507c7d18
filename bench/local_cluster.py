"""A multi-node Ray cluster on one machine, each node started with `ray start` (issue 50).

Every node is its own raylet with its own object store, ports, session directory and
resources (``--num-cpus``, a custom resource naming it); nodes join the head over its GCS
port. ``kill(name)`` loses a whole node the way a preempted VM or an evicted pod does: SIGKILL
to its raylet and to every process under it (workers, actors, agents), nothing shut down
cleanly; ``replace(name)`` starts a node with the same resources under a new name, as a
Kubernetes ReplicaSet would. Used by bench/node_faults.py (and the suite's small scenario).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

PORT_FLAGS = ("node-manager-port", "object-manager-port", "metrics-export-port", "runtime-env-agent-port",
              "dashboard-agent-grpc-port", "dashboard-agent-listen-port")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (every socket bound until all are picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Node:
    name: str
    num_cpus: float
    temp_dir: str
    ports: dict[str, int]
    resources: dict[str, float] = field(default_factory=dict)
    node_id: str | None = None  # Ray's NodeID, once registered


class LocalCluster:
    def __init__(self, object_store_mb: int = 300, env: dict | None = None):
        self.root = tempfile.mkdtemp(prefix="sidnodes-", dir="/tmp")  # short: socket paths < 108 bytes
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}
        bin_dir = os.path.dirname(sys.executable)
        self.env["PATH"] = f"{bin_dir}:{self.env.get('PATH', '')}"
        self.ray = os.path.join(bin_dir, "ray")
        self.object_store = object_store_mb * 1024 * 1024
        self.nodes: dict[str, Node] = {}
        self.address: str | None = None
        self._count = 0
        self._started = 0

    # -- lifecycle ------------------------------------------------------------------------
    def start_head(self, num_cpus: float = 0) -> Node:
        gcs, client, dash, *ports = free_ports(3 + len(PORT_FLAGS))
        node = self._node("head", num_cpus, ports)
        self._ray_start(node, ["--head", f"--port={gcs}", f"--ray-client-server-port={client}",
                               f"--dashboard-port={dash}", "--include-dashboard=false"])
        self.address = f"127.0.0.1:{gcs}"
        return node

    def add_node(self, name: str, num_cpus: float, resources: dict[str, float] | None = None) -> Node:
        if self.address is None:
            raise ValueError("start_head() first")
        node = self._node(name, num_cpus, free_ports(len(PORT_FLAGS)), resources)
        self._ray_start(node, [f"--address={self.address}"])
        return node

    def kill(self, name: str) -> int:
        """SIGKILL the node's raylet and everything under it -> processes killed."""
        import psutil

        node = self.nodes.pop(name)
        mark = f"--node_manager_port={node.ports['node-manager-port']}"
        roots = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                cmd = p.info["cmdline"] or []
                if any(mark in a for a in cmd) or any(node.temp_dir in a for a in cmd):
                    roots.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        procs = {}
        for r in roots:
            procs[r.pid] = r
            try:
                for c in r.children(recursive=True):
                    procs[c.pid] = c
            except psutil.NoSuchProcess:
                pass
        for p in procs.values():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(procs.values()), timeout=10)
        return len(procs)

    def replace(self, name: str, num_cpus: float, resources: dict[str, float] | None = None) -> Node:
        self._count += 1
        return self.add_node(f"{name}-r{self._count}", num_cpus, resources)

    def stop(self) -> None:
        for name in list(self.nodes):
            try:
                self.kill(name)
            except Exception:  # noqa: BLE001  (best effort at teardown: the next node still goes)
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    # -- helpers --------------------------------------------------------------------------
    def _node(self, name, num_cpus, ports, resources=None) -> Node:
        if name in self.nodes:
            raise ValueError(f"a node named {name!r} is running")
        temp_dir = os.path.join(self.root, name)
        os.makedirs(temp_dir)
        node = Node(name, num_cpus, temp_dir, dict(zip(PORT_FLAGS, ports)), dict(resources or {}))
        self.nodes[name] = node
        return node

    def _ray_start(self, node: Node, extra: list[str]) -> None:
        import json

        self._started += 1  # worker ports below the ephemeral range the other ports come from
        lo = 10000 + 200 * (self._started % 45)
        cmd = [self.ray, "start", f"--num-cpus={node.num_cpus:g}", f"--temp-dir={node.temp_dir}",
               f"--object-store-memory={self.object_store}", "--disable-usage-stats",
               f"--resources={json.dumps({**node.resources, 'node:' + node.name: 1})}",
               *[f"--{flag}={port}" for flag, port in node.ports.items()],
               f"--min-worker-port={lo}", f"--max-worker-port={lo + 199}",
               *extra]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            self.nodes.pop(node.name, None)
            raise RuntimeError(f"ray start ({node.name}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        node.node_id = self._wait_registered(node)

    def _wait_registered(self, node: Node, timeout_s: float = 60) -> str:
        """The NodeID of the node once the GCS lists it alive."""
        import ray

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if ray.is_initialized():
                for n in ray.nodes():
                    if n["Alive"] and n["NodeManagerPort"] == node.ports["node-manager-port"]:
                        return n["NodeID"]
            else:
                return ""  # the driver is not connected yet (the head): read later
            time.sleep(0.2)
        raise RuntimeError(f"node {node.name} did not register within {timeout_s:.0f} s")

    def name_of(self, node_id: str) -> str | None:
        """Our name of a Ray NodeID (by its node manager port)."""
        import ray

        port = next((n["NodeManagerPort"] for n in ray.nodes() if n["NodeID"] == node_id), None)
        return next((name for name, n in self.nodes.items() if n.ports["node-manager-port"] == port), None)
