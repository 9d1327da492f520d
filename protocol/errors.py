"""Specific exceptions for every way a task, a message or a budget can be refused.

Each message names the field, the value found and the limit, so an operator can act on it.
"""

from __future__ import annotations

import enum


class FedSynthError(Exception):
    """Base class of every error fedsynth raises on purpose."""


class ConfigError(FedSynthError, ValueError):
    """A configuration or manifest field is outside its allowed range."""


class DataFileError(FedSynthError, ValueError):
    """A private data file is malformed (the message names the file and line)."""


class UnknownLabelError(DataFileError):
    """A record carries a label that the task manifest does not list."""


class ModelMismatchError(FedSynthError):
    """The local model's fingerprint (weights and tokenizer) differs from the manifest's."""


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


class ClockSkewError(ProtocolError):
    """A request's send time is further from this node's clock than the stage deadline."""


class ShapeError(ProtocolError):
    """A vector has the wrong shape or dtype."""


class FieldRangeError(ProtocolError):
    """An integer is outside the field [0, 2^bits) or an encoding would overflow it."""


class ManifestVerificationError(PolicyViolationError):
    """A manifest's privacy terms do not hold up when the holder recomputes them itself."""


class NoiseTooLowError(ManifestVerificationError):
    """A manifest's noise variance is below what its epsilon and delta require."""


class SensitivityUnderstatedError(ManifestVerificationError):
    """A manifest states a sensitivity below the bound of one record's contribution."""


class InconsistentNoiseError(ManifestVerificationError):
    """A manifest's noise multiplier does not match its variance and sensitivity."""


class AdjacencyMismatchError(ManifestVerificationError):
    """A manifest names a neighbouring relation other than the one its sensitivity is for."""


class ScaleTooSmallError(ManifestVerificationError, ConfigError):
    """A fixed-point scale so coarse that rounding inflates a record's bound beyond the limit."""


class BudgetStoreError(PolicyViolationError):
    """A holder's budget store is missing, unreadable or not a fedsynth budget store."""


class RefusalCategory(enum.Enum):
    """The only thing a refusing holder tells the coordinator about why it refused.

    Details (record counts, 1/n, lifetime spend, file lines) stay in the holder's own log: a
    coordinator can provoke refusals at will, so their text must not carry private numbers.
    """

    POLICY = "policy"
    BUDGET = "budget"
    MODEL = "model"
    DATA = "data"
    PROTOCOL = "protocol"


def category_of(exc: BaseException) -> RefusalCategory:
    """The refusal category of an exception (anything unexpected counts as ``protocol``)."""
    if isinstance(exc, BudgetExceededError | BudgetStoreError):
        return RefusalCategory.BUDGET
    if isinstance(exc, PolicyViolationError):
        return RefusalCategory.POLICY
    if isinstance(exc, ModelMismatchError):
        return RefusalCategory.MODEL
    if isinstance(exc, DataFileError):
        return RefusalCategory.DATA
    return RefusalCategory.PROTOCOL


def refusal_summary(reason: str | None) -> str:
    """``"<stage>: <category>"`` for a report, from a refusal or failure as the coordinator saw it.

    A reply's reason is the holder's category (a well-behaved holder sends nothing else); any
    other text (an older client's detailed message, a coordinator-side parse failure) is
    reported as ``protocol``, so a published report never carries a holder's details.
    """
    text = (reason or "").strip()
    stage, sep, rest = text.partition(": ")
    if not sep or not (stage.replace("_", "").isalpha() and stage.islower()):
        stage, rest = "", text
    categories = {c.value for c in RefusalCategory}
    category = rest if rest in categories else RefusalCategory.PROTOCOL.value
    return f"{stage}: {category}" if stage else category


class ReleaseIntegrityError(FedSynthError, ValueError):
    """A release file's digest or its internal consistency check fails: altered or corrupt."""


class IdentityError(ConfigError):
    """A holder's signing identity or the consortium roster is missing, malformed or mismatched."""


class KeyAuthenticationError(ProtocolError):
    """A round key is unsigned, wrongly signed, substituted, or not from a roster member."""


class InconsistentSurvivorsError(ProtocolError):
    """The survivor set is not the one this holder signed, or too few survivors signed it."""


class UnsafeThresholdError(PolicyViolationError):
    """A threshold t below the floor the secure sum's guarantee needs for K and the colluders."""


class ShareError(ProtocolError):
    """A Shamir share is malformed or carries a zero, repeated or out-of-range index."""


class TooFewSharesError(ShareError, TooFewParticipantsError):
    """Fewer shares than the threshold t are at hand; nothing is reconstructed."""


class TimeBudgetError(ConfigError):
    """A study's estimated running time exceeds its configured time budget."""


class FolderInUseError(ConfigError):
    """Another run holds the results folder's lock (a study or curve resuming into it)."""


class TaskFileError(ConfigError):
    """A coordinator's task file is malformed, incomplete, unsafe or names something private."""


class LedgerError(FedSynthError):
    """The coordinator's release ledger is unreadable, not a fedsynth ledger, or refuses a row."""


class DuplicateReleaseError(LedgerError):
    """A release id is already in the ledger: recording it again would charge it twice."""


class CertificateError(ConfigError):
    """A TLS certificate or key is expired, not yet valid, not signed by the CA, or mismatched."""


class DeploymentError(FedSynthError):
    """A Flower process did not start or stopped, or registering a holder's node key failed."""


class UnknownReleaseError(ConfigError):
    """A request names a release the coordinator's store does not hold as a valid file."""


class AuthenticationError(FedSynthError):
    """A request carries no bearer token or one the service does not know."""


class RateLimitError(FedSynthError):
    """A consumer's token has used up its request or sample allowance for now."""


class AppNotTrustedError(PolicyViolationError):
    """A run's app bundle is not one the holder pinned (hash or fedsynth version differ)."""


class NonPositiveCountError(ConfigError):
    """A release's noisy count for a class is zero, negative or not finite: unusable vector."""
