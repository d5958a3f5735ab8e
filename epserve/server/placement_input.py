"""A placement POSTed to /placement: checked against the running one, or refused with a 400 naming the field.

    document --header vs the running placement (before any table whose size the document sets is built)
             --> Placement.from_dict (validation by layer / expert / GPU) --> check_replaceable --> Placement
"""

from __future__ import annotations

from epserve.server import errors
from placement.errors import PlacementError
from placement.moves import check_replaceable
from placement.placement import Placement


def posted_placement(doc: dict, running: Placement) -> Placement:
    """The placement ``doc`` describes, fit to replace ``running``; APIError(400) naming the field otherwise."""
    try:
        _check_shape(doc, running)
        placement = Placement.from_dict(doc)
        check_replaceable(running, placement)
    except PlacementError as exc:
        raise errors.bad_request(f"placement: {exc}", param=_placement_param(str(exc), doc)) from None
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:   # a malformed field
        raise errors.bad_request(f"placement: not a valid placement document ({type(exc).__name__}: {exc})",
                                 param=None) from None
    return placement


def _check_shape(doc: dict, running: Placement) -> None:
    """The document's header against the running placement's (PlacementError naming the field)."""
    cluster = doc.get("cluster")
    for name, want in (("num_layers", running.num_layers), ("num_experts", running.num_experts)):
        if name in doc and doc[name] != want:
            raise PlacementError(f"{name}: the new placement has {doc[name]!r}, the running one {want}")
    for name in ("nodes", "gpus_per_node"):
        if isinstance(cluster, dict) and name in cluster and cluster[name] != getattr(running.cluster, name):
            raise PlacementError(f"cluster.{name}: the new placement has {cluster[name]!r}, the running cluster "
                                 f"{getattr(running.cluster, name)}")


def _placement_param(message: str, doc: dict) -> str | None:
    """The placement field a PlacementError message is about (its messages name it in words)."""
    head = message.split(":", 1)[0]
    if head in ("num_layers", "num_experts", "slots_per_gpu") or head.startswith("cluster."):
        return head
    if message.startswith("layer ") or "expert_to_gpu" in message:
        return "expert_to_gpus" if "expert_to_gpus" in doc or doc.get("version") == 2 else "expert_to_gpu"
    if "missing '" in message:
        return message.split("missing '", 1)[1].split("'", 1)[0]
    for field in ("version", "cluster", "slots_per_gpu", "num_layers"):
        if message.startswith(f"placement {field}") or message.startswith(field):
            return field
    return None
