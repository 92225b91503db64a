"""This process's place in a launch, and a free port for single-process rendezvous."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in a launch (torchrun's and deepspeed's RANK / LOCAL_RANK / WORLD_SIZE)."""

    rank: int
    local_rank: int
    world_size: int

    @classmethod
    def from_environ(cls) -> "LaunchEnv":
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for single-process or test rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
