"""Dispatch: (node kind, cmd, caller) -> core call; argsz/minsz/copy rules in one place."""

from .arg import PAGE_SIZE, IoctlArg
from .dispatcher import Dispatcher, GroupNode, Node, RetryRequest, node_kind, region_ops

__all__ = ["Dispatcher", "GroupNode", "IoctlArg", "Node", "PAGE_SIZE", "RetryRequest", "node_kind",
           "region_ops"]
