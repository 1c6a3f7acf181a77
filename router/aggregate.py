"""Answers that speak for the whole fleet: statistics summed, repository indexes merged."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2

# Repeated sub-messages that describe the same thing on every instance, and their key.
_KEYED = {"model_stats": ("name", "version"), "batch_stats": ("batch_size",),
          "memory_usage": ("type", "id")}
_LATEST = {"last_inference"}  # a timestamp: the newest wins, it is not summed


def merge_statistics(answers: Sequence[bytes]) -> bytes:
    """Sum every counter of ModelStatistics over the instances, model by model."""
    merged = service_pb2.ModelStatisticsResponse()
    for raw in answers:
        _add(merged, service_pb2.ModelStatisticsResponse.FromString(raw))
    return merged.SerializeToString()


def _add(total: Message, part: Message) -> None:
    for field, value in part.ListFields():
        name = field.name
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            target = getattr(total, name)
            for key, item in value.items():
                _add(target[key], item)
        elif _is_repeated(field) and field.message_type is not None:
            key_fields = _KEYED.get(name, ())
            target = getattr(total, name)
            for item in value:
                match = next((t for t in target if key_fields and all(
                    getattr(t, k) == getattr(item, k) for k in key_fields)), None)
                if match is None:
                    target.add().CopyFrom(item)
                else:
                    _add(match, item)
        elif field.message_type is not None:
            _add(getattr(total, name), value)
        elif name in _LATEST:
            setattr(total, name, max(getattr(total, name), value))
        elif field.type in _NUMBERS and name not in ("batch_size", "id"):
            setattr(total, name, getattr(total, name) + value)
        elif not getattr(total, name):
            setattr(total, name, value)


_NUMBERS = {getattr(FieldDescriptor, f"TYPE_{name}") for name in (
    "DOUBLE", "FLOAT", "INT64", "UINT64", "INT32", "FIXED64", "FIXED32", "UINT32", "SFIXED32",
    "SFIXED64", "SINT32", "SINT64")}


def _is_repeated(field: FieldDescriptor) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 5.29; `label` is deprecated
    return repeated if repeated is not None else field.label == field.LABEL_REPEATED


def merge_repository_index(answers: Sequence[bytes]) -> bytes:
    """One entry per (model, version): READY if any instance has it ready."""
    merged: dict[tuple[str, str], service_pb2.RepositoryIndexResponse.ModelIndex] = {}
    for raw in answers:
        for model in service_pb2.RepositoryIndexResponse.FromString(raw).models:
            key = (model.name, model.version)
            known = merged.get(key)
            if known is None or (model.state == "READY" and known.state != "READY"):
                merged[key] = model
    response = service_pb2.RepositoryIndexResponse(
        models=[merged[key] for key in sorted(merged)])
    return response.SerializeToString()
