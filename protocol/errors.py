"""Specific exceptions for every way a task, a message or a budget can be refused.

Each message names the field, the value found and the limit, so an operator can act on it.
"""

from __future__ import annotations


class FedSynthError(Exception):
    """Base class of every error fedsynth raises on purpose."""


class ConfigError(FedSynthError, ValueError):
    """A configuration or manifest field is outside its allowed range."""


class DataFileError(FedSynthError, ValueError):
    """A private data file is malformed (the message names the file and line)."""


class UnknownLabelError(DataFileError):
    """A record carries a label that the task manifest does not list."""


class ModelMismatchError(FedSynthError):
    """The local model's weight fingerprint differs from the manifest's."""


class PolicyViolationError(FedSynthError):
    """A task manifest asks for more than the client's own privacy policy allows."""


class BudgetExceededError(PolicyViolationError):
    """Running the task would spend more privacy budget than is left."""


class TooFewParticipantsError(FedSynthError):
    """Fewer than the reconstruction threshold t of clients are left; nothing is released."""


class ProtocolError(FedSynthError):
    """A secure-sum message is malformed, out of order, duplicated, late or from a stranger."""


class StageOrderError(ProtocolError):
    """A protocol stage arrived out of order."""


class DuplicateSubmissionError(ProtocolError):
    """The same client submitted twice in one stage."""


class LateSubmissionError(ProtocolError):
    """A submission arrived after its stage's deadline or for a stale round."""


class ShapeError(ProtocolError):
    """A vector has the wrong shape or dtype."""


class FieldRangeError(ProtocolError):
    """An integer is outside the field [0, 2^bits) or an encoding would overflow it."""
