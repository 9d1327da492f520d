"""Named privacy mutants: break one guarantee on purpose and check that the fast tests notice.

Generic mutation operators (``scripts/mutmut.sh``) change one token at a time; they do not
produce the breaks the privacy argument is about: pairwise masks removed on both sides, a PRG
that ignores its key, clients that add no noise, a coordinator calibrating at scale/2, a holder
that skips its own checks. Each of those is written here as exact text patches (file, old
snippet, new snippet). A snippet that is not found exactly once stops the script, so a patch
that no longer matches the source can never test nothing.

For each mutant the script copies the working tree (``git ls-files``: tracked files plus
untracked files git does not ignore, as they are on disk) into a temporary directory, applies
the patches there, and runs the mutant's short test selection with ``-x -m "not slow"``. The
copy's code is imported, not the editable install: a staging directory inside the copy holds a
``fedsynth`` package whose role subpackages link to the copy's role dirs, and it goes first on
``PYTHONPATH``; a small pytest plugin records, at the end of every run, where each loaded
``fedsynth`` module came from, and any module from outside the copy makes the run invalid.

A control run first checks that the unpatched copy passes the union of all selections
(otherwise a "killed" means nothing). The result of a mutant is KILLED (a selected test failed;
its name is reported), SURVIVED (every selected test passed), or BROKEN (pytest could not
collect, ran no test or timed out, or code came from outside the copy). Exit status 0 only if
the control passed and every mutant was KILLED.

Usage (from the repository root)::

    .venv/bin/python scripts/privacy_mutants.py               # control + every mutant
    .venv/bin/python scripts/privacy_mutants.py masks-removed prg-ignores-key
    .venv/bin/python scripts/privacy_mutants.py --list        # names, patches and tests
    .venv/bin/python scripts/privacy_mutants.py --check       # only check the snippets match
    .venv/bin/python scripts/privacy_mutants.py --all-failures  # no -x: every failing test
    .venv/bin/python scripts/privacy_mutants.py --markdown out.md   # also write the table
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("protocol", "client", "server", "simulations")
STAGE = ".privacy-mutant-stage"
GUARD = "privacy_mutant_guard"
PYTEST_ARGS = ("-q", "-n", "0", "-m", "not slow", "-p", "no:cacheprovider", "-rfE")
TIMEOUT_S = 1800


class PatchError(RuntimeError):
    """A mutant's snippet is not found exactly once in the file it patches."""


@dataclass(frozen=True)
class Patch:
    """Replace ``old`` (which must occur exactly once) by ``new`` in ``path``."""

    path: str
    old: str
    new: str


@dataclass(frozen=True)
class Mutant:
    """One deliberate privacy break and the fast tests that must catch it.

    Attributes:
        name: Short identifier used on the command line and in the table.
        summary: What the break does, in one line.
        patches: Text patches, applied in order.
        tests: pytest node ids (``file::function``: every parametrization), run in this order.
    """

    name: str
    summary: str
    patches: tuple[Patch, ...]
    tests: tuple[str, ...]


_CLIENT_PAIRWISE = """\
            if other > self._node_id:
                add_inplace(masked, mask, cfg.bits)
            else:
                sub_inplace(masked, mask, cfg.bits)
"""
_SERVER_PAIRWISE = """\
                if owner > survivor:
                    sub_inplace(total, mask, cfg.bits)
                else:
                    add_inplace(total, mask, cfg.bits)
"""
_SKELLAM_CALIBRATION = """\
        variance = calibrate_skellam_variance(epsilon=eps, delta=d, l1=l1, l2=l2)
"""
_SKELLAM_CALIBRATION_HALF = """\
        half_l2, half_l1 = vector_record_sensitivity(
            scale=s / 2, layers=n_layers, count_weight=gamma, dim=n_dim
        )
        variance = calibrate_skellam_variance(epsilon=eps, delta=d, l1=half_l1, l2=half_l2)
"""
_GAUSSIAN_CALIBRATION = """\
        sigma = calibrate_gaussian(epsilon=eps, delta=d, compositions=1, accountant="pld")
        variance = (sigma * l2) ** 2
"""
_GAUSSIAN_CALIBRATION_HALF = """\
        sigma = calibrate_gaussian(epsilon=eps, delta=d, compositions=1, accountant="pld")
        variance = (sigma * l2 / 2) ** 2
"""

SECAGG_ACTIVE = "tests/protocol/test_secagg_active.py"
VERIFICATION = "tests/protocol/test_verification.py"
CONTRIBUTION = "tests/protocol/test_contribution.py"
ROUND_NOISE = "tests/server/test_round_noise.py"
SECURE_ROUND = "tests/server/test_secure_round.py"
EXACT_NOISE = "tests/protocol/test_exact_noise.py"
NOISE_CHECK = "tests/simulations/test_noise_check.py"
FLOWER_APP = "tests/client/test_flower_app.py"
SKELLAM_GDP = "tests/protocol/test_skellam_gdp.py"


def _verification_skipped(path: str) -> tuple[Patch, ...]:
    """A holder's accept without its manifest check: fake verified terms stand in for it."""
    return (
        Patch(
            path,
            "        verified = verify_manifest(manifest)  # noise and sensitivity recomputed",
            "        verified = VerifiedTerms(  # mutant: verify_manifest(manifest) skipped\n"
            "            l2_sensitivity=0.0, l1_sensitivity=0.0, epsilon=0.0,\n"
            "            trusted_coordinator=False,\n"
            "        )  # noise and sensitivity",
        ),
        Patch(
            path,
            "from fedsynth.protocol.verification import verify_manifest\n",
            "from fedsynth.protocol.verification import VerifiedTerms, verify_manifest\n",
        ),
    )


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        name="masks-removed",
        summary="no pairwise masks: clients do not add them, the coordinator does not cancel them",
        patches=(
            Patch(
                "protocol/secagg/client.py",
                _CLIENT_PAIRWISE,
                "            continue  # mutant: no pairwise mask\n",
            ),
            Patch(
                "protocol/secagg/server.py",
                _SERVER_PAIRWISE,
                "                continue  # mutant: no pairwise mask to cancel\n",
            ),
        ),
        tests=(
            f"{SECAGG_ACTIVE}::test_view_minus_self_mask_reveals_no_input",
            f"{SECURE_ROUND}::test_the_coordinators_whole_view_still_hides_each_contribution",
        ),
    ),
    Mutant(
        name="prg-ignores-key",
        summary="the mask PRG expands a constant key instead of its seed",
        patches=(
            Patch(
                "protocol/secagg/crypto.py",
                "Cipher(algorithms.ChaCha20(key, nonce), mode=None)",
                "Cipher(algorithms.ChaCha20(bytes(32), nonce), mode=None)",
            ),
        ),
        tests=(
            f"{SECAGG_ACTIVE}::test_masks_depend_on_the_keys_and_the_session",
            f"{SECAGG_ACTIVE}::test_view_minus_self_mask_reveals_no_input",
            f"{SECURE_ROUND}::test_the_coordinators_whole_view_still_hides_each_contribution",
        ),
    ),
    Mutant(
        name="no-noise-vectors",
        summary="a dataset-vector client adds no Skellam noise share to its sums",
        patches=(
            Patch(
                "protocol/contribution.py",
                "noisy = sums.reshape(-1) + share_noise(",
                "noisy = sums.reshape(-1) + 0 * share_noise(",
            ),
        ),
        tests=(
            f"{CONTRIBUTION}::test_noise_variance_of_the_sum",
            f"{ROUND_NOISE}::test_vector_release_carries_the_target_noise",
            f"{NOISE_CHECK}::test_a_release_with_its_stated_noise_passes[distributed]",
        ),
    ),
    Mutant(
        name="no-noise-votes",
        summary="a PE client adds no Skellam noise share to its vote histogram",
        patches=(
            Patch(
                "protocol/pe_manifest.py",
                "noisy = votes.astype(np.int64) + share_noise(",
                "noisy = votes.astype(np.int64) + 0 * share_noise(",
            ),
        ),
        tests=(
            "tests/protocol/test_pe_manifest.py::test_encode_decode_distributed_noise",
            f"{ROUND_NOISE}::test_pe_votes_carry_the_target_noise",
        ),
    ),
    Mutant(
        name="noise-share-zero",
        summary="the distributed noise share variance is 0 (for vectors and votes)",
        patches=(
            Patch(
                "protocol/manifest.py",
                "        return privacy.total_variance / (privacy.threshold - privacy.colluders)\n",
                "        return 0.0 * privacy.total_variance"
                " / (privacy.threshold - privacy.colluders)\n",
            ),
        ),
        tests=(
            f"{VERIFICATION}::test_each_client_adds_the_verified_variance",
            f"{CONTRIBUTION}::test_noise_variance_of_the_sum",
            f"{ROUND_NOISE}::test_vector_release_carries_the_target_noise",
            f"{NOISE_CHECK}::test_a_release_with_its_stated_noise_passes[distributed]",
        ),
    ),
    Mutant(
        name="noise-share-ignores-colluders",
        summary="distributed shares are sized for t holders even when c of them may add none",
        patches=(
            Patch(
                "protocol/manifest.py",
                "        return privacy.total_variance / (privacy.threshold - privacy.colluders)\n",
                "        return privacy.total_variance / privacy.threshold\n",
            ),
        ),
        tests=(f"{SECURE_ROUND}::test_noise_is_sized_for_the_colluders_a_holder_assumes",),
    ),
    Mutant(
        name="policy-ignores-colluders",
        summary="a holder takes a task whose noise is sized for fewer colluders than it assumes",
        patches=(
            Patch(
                "client/policy.py",
                '        if p.mode == "distributed" and noisy'
                " and p.colluders < self.max_colluders:\n",
                "        if False:\n",
            ),
        ),
        tests=(
            "tests/client/test_policy.py::test_policy_refusals_name_the_field",
            f"{SECURE_ROUND}::test_noise_is_sized_for_the_colluders_a_holder_assumes",
        ),
    ),
    Mutant(
        name="split-manifests-unbound",
        summary="the secure sum's signatures do not bind the task's manifest",
        patches=(
            Patch(
                "protocol/secagg/config.py",
                '            "terms": self.terms,\n',
                '            "terms": "",\n',
            ),
        ),
        tests=(
            "tests/protocol/test_secagg.py::test_keys_signed_under_other_task_terms_are_refused",
            f"{SECURE_ROUND}::test_holders_handed_different_manifests_under_one_task_refuse_each_other",
        ),
    ),
    Mutant(
        name="excess-removed-one-too-many",
        summary="exact sharing removes one more excess component than the survivors allow",
        patches=(
            Patch(
                "protocol/exact_noise.py",
                "        return range(self._floor, honest)\n",
                "        return range(self._floor, min(honest + 1, self.clients))\n",
            ),
        ),
        tests=(
            f"{EXACT_NOISE}::test_every_survivor_count_keeps_exactly_the_target",
            f"{ROUND_NOISE}::test_vector_release_carries_the_target_noise",
        ),
    ),
    Mutant(
        name="whole-removed-despite-a-dropout",
        summary="exact sharing removes the whole-round component when one holder dropped",
        patches=(
            Patch(
                "protocol/exact_noise.py",
                "        if honest == self.whole:\n            return range(honest, honest + 1)\n",
                "        if self.whole and honest >= self.whole - 1:\n"
                "            return range(self.whole, self.whole + 1)\n",
            ),
        ),
        tests=(
            f"{EXACT_NOISE}::test_every_survivor_count_keeps_exactly_the_target",
            f"{EXACT_NOISE}::test_round_noise_after_removal_has_the_target_variance",
        ),
    ),
    Mutant(
        name="blocks-remove-one-unit-too-many",
        summary="binary blocks remove one unit of excess more than leaves the target (K > 26)",
        patches=(
            Patch(
                "protocol/exact_noise.py",
                "            return self._blocks_for(self.units_removed(survivors))\n",
                "            return self._blocks_for(\n"
                "                min(self.units_removed(survivors) + 1, self.units)\n"
                "            )  # mutant\n",
            ),
        ),
        tests=(
            f"{EXACT_NOISE}::"
            "test_blocks_keep_the_target_within_the_tolerance_and_exactly_at_both_ends",
        ),
    ),
    Mutant(
        name="excess-revealed-for-all-k",
        summary="a holder reveals its excess noise for all K, not for the survivor set it signed",
        patches=(
            Patch(
                "client/participant.py",
                "            revealed = revealed_seed(seed, schedule, len(survivors))\n",
                "            revealed = revealed_seed(seed, schedule, len(task.node_ids))\n",
            ),
        ),
        tests=(
            f"{SECURE_ROUND}::"
            "test_exact_noise_seeds_are_revealed_at_unmask_for_the_signed_survivors_only",
        ),
    ),
    Mutant(
        name="excess-uploaded-for-all-k",
        summary="asked to upload, a holder sends its excess noise for all K, not the signed set",
        patches=(
            Patch(
                "client/participant.py",
                "                excess = excess_noise(seed, schedule, len(survivors), task.dim)\n",
                "                excess = excess_noise("
                "seed, schedule, len(task.node_ids), task.dim)\n",
            ),
        ),
        tests=(f"{SECURE_ROUND}::test_uploaded_excess_removes_exactly_what_the_seeds_would",),
    ),
    Mutant(
        name="manifest-scale-half",
        summary="build_manifest calibrates noise and sensitivity for scale/2 (4x too little noise)",
        patches=(
            Patch(
                "server/coordinator.py",
                "        dim=row_dim,\n        scale=config.scale,\n",
                "        dim=row_dim,\n        scale=config.scale / 2,\n",
            ),
        ),
        tests=(
            f"{VERIFICATION}::test_build_manifest_states_the_record_bound_and_enough_noise",
            f"{ROUND_NOISE}::test_vector_release_carries_the_target_noise",
        ),
    ),
    Mutant(
        name="variance-scale-half",
        summary="calibrate_vector_release states the true sensitivity with the scale/2 variance",
        patches=(
            Patch("protocol/accounting.py", _SKELLAM_CALIBRATION, _SKELLAM_CALIBRATION_HALF),
            Patch("protocol/accounting.py", _GAUSSIAN_CALIBRATION, _GAUSSIAN_CALIBRATION_HALF),
        ),
        tests=(
            f"{VERIFICATION}::test_build_manifest_states_the_record_bound_and_enough_noise",
            "tests/protocol/test_accounting.py::test_vector_release_distributed_close_to_gaussian",
            "tests/protocol/test_accounting.py::test_central_calibration_covers_the_rounded_record",
        ),
    ),
    Mutant(
        name="holder-skips-verification",
        summary="a dataset-vector holder accepts a manifest without recomputing its noise",
        patches=_verification_skipped("client/contributor.py"),
        tests=(
            f"{VERIFICATION}::test_contributor_refuses_low_noise_before_anything_else",
            f"{ROUND_NOISE}::test_holders_refuse_a_round_with_a_quarter_of_the_noise",
        ),
    ),
    Mutant(
        name="pe-holder-skips-verification",
        summary="a PE holder accepts a round manifest without recomputing its noise",
        patches=_verification_skipped("client/pe_voter.py"),
        tests=(f"{VERIFICATION}::test_pe_voter_refuses_low_noise_before_anything_else",),
    ),
    Mutant(
        name="round-key-signature-skipped",
        summary="a holder does not verify the signatures on its peers' round keys",
        patches=(
            Patch(
                "protocol/secagg/client.py",
                "            if not keys.verify(node=node, config=self._config, sign_pk=expected):",
                "            if False:  # mutant: signature on the round keys not checked",
            ),
        ),
        tests=(
            f"{SECAGG_ACTIVE}::test_key_substitution_by_the_coordinator_is_detected",
            f"{SECAGG_ACTIVE}::test_wrongly_signed_key_is_refused",
            f"{SECAGG_ACTIVE}::test_unsigned_key_is_refused_and_nothing_is_shared",
            f"{SECURE_ROUND}::test_a_substituted_key_is_refused_by_the_holder",
        ),
    ),
    Mutant(
        name="consistency-signatures-skipped",
        summary="at unmask a holder releases shares without t survivor signatures over U3",
        patches=(
            Patch(
                "protocol/secagg/client.py",
                "        if len(valid) < self._config.threshold:\n",
                "        if False:  # mutant: survivor signatures not counted\n",
            ),
        ),
        tests=(
            f"{SECAGG_ACTIVE}::test_inconsistent_survivor_lists_abort_before_any_share_is_revealed",
            f"{SECAGG_ACTIVE}::test_a_holder_reveals_only_the_survivor_set_it_signed",
            f"{SECURE_ROUND}::test_inconsistent_survivor_lists_abort_before_any_share_is_revealed",
        ),
    ),
    Mutant(
        name="consistency-set-skipped",
        summary="at unmask a holder accepts a survivor set other than the one it signed",
        patches=(
            Patch(
                "protocol/secagg/client.py",
                "        if sorted(told_survivors) != self._u3:\n",
                "        if False:  # mutant: survivor set not compared with the signed one\n",
            ),
        ),
        tests=(
            # The other consistency tests cannot catch this one alone: the signature count
            # still stops them (see consistency-signatures-skipped).
            f"{SECAGG_ACTIVE}::test_a_holder_reveals_only_the_survivor_set_it_signed",
        ),
    ),
    Mutant(
        name="charge-after-read",
        summary="a holder charges its budget only after computing on its records",
        patches=(
            Patch(
                "client/participant.py",
                "        self.committed(task, state)\n"
                "        value = self.contribution(task, payload, state)\n",
                "        value = self.contribution(task, payload, state)  # mutant: read first\n"
                "        self.committed(task, state)\n",
            ),
        ),
        tests=(
            f"{SECURE_ROUND}::test_a_holder_pays_before_it_reads_its_data_so_a_failure_is_never_free",
        ),
    ),
    Mutant(
        name="record-cap-over-task-labels",
        summary="the holder's max_records is compared with the task's labels' records only",
        patches=(
            Patch(
                "client/participant.py",
                "        self.settings.policy.check_records(self.file_records)\n",
                "        self.settings.policy.check_records(self._counted or 0)  # mutant\n",
            ),
        ),
        tests=(
            f"{FLOWER_APP}::test_the_record_cap_counts_the_whole_file_whatever_the_task_labels",
        ),
    ),
    Mutant(
        name="non-finite-reference-accepted",
        summary="a public reference holding NaN passes the holder's setup check",
        patches=(
            Patch(
                "protocol/manifest.py",
                "        if not np.all(np.isfinite(reference)):\n",
                "        if False:  # mutant: a NaN reference is accepted\n",
            ),
        ),
        tests=(f"{FLOWER_APP}::test_a_non_finite_reference_is_refused_at_setup_whatever_the_data",),
    ),
    Mutant(
        name="context-unchecked",
        summary="a prompt plus max_text_tokens beyond the model's context passes setup",
        patches=(
            Patch(
                "protocol/features.py",
                "    if prompt + spec.max_text_tokens > context:\n",
                "    if False:  # mutant: no context check\n",
            ),
        ),
        tests=(f"{FLOWER_APP}::test_a_text_length_beyond_the_model_context_is_refused_at_setup",),
    ),
    Mutant(
        name="survivors-below-min-holders",
        summary="a holder signs and unmasks a survivor set smaller than its min_holders",
        patches=(
            Patch(
                "client/participant.py",
                "        if count < floor:\n",
                "        if False:  # mutant: any survivor set of at least t\n",
            ),
        ),
        tests=(f"{SECURE_ROUND}::test_min_holders_bounds_the_survivors_not_only_the_key_exchange",),
    ),
    Mutant(
        name="adjacency-unchecked",
        summary="a holder accepts a manifest that names another neighbouring relation (the "
        "release would state a guarantee the noise does not give)",
        patches=(
            Patch(
                "protocol/verification.py",
                "    if privacy.adjacency != expected:\n",
                "    if False:  # mutant: any adjacency label accepted\n",
            ),
        ),
        tests=(
            "tests/protocol/test_verification.py::test_another_adjacency_label_is_refused",
            "tests/protocol/test_verification.py::"
            "test_contributor_refuses_another_adjacency_before_anything_else",
        ),
    ),
    Mutant(
        name="charge-before-authentication",
        summary="a holder pays for its input before the peers' shares are authenticated",
        patches=(
            Patch(
                "client/participant.py",
                "        client.check_ciphertexts(ciphertexts)\n",
                "        pass  # mutant: shares checked only after the charge\n",
            ),
        ),
        tests=(
            f"{SECURE_ROUND}::"
            "test_shares_that_fail_authentication_are_refused_before_the_budget_is_charged",
        ),
    ),
    Mutant(
        name="data-index-ignored",
        summary="a holder reads its whole data file again at every setup (timing grows with it)",
        patches=(
            Patch(
                "client/data_index.py",
                "            if cached is not None:\n",
                "            if False:  # mutant: the index is never consulted\n",
            ),
        ),
        tests=(
            "tests/client/test_data_index.py::test_a_setup_does_not_read_a_settled_file_again",
            "tests/client/test_data_index.py::test_a_settled_file_is_read_once_then_looked_up",
        ),
    ),
    Mutant(
        name="masked-input-reply-not-held",
        summary="a holder answers its masked input when done, not at its masked_input_reply_s",
        patches=(
            Patch(
                "client/participant.py",
                "        if elapsed < reply_s:\n",
                "        if False:  # mutant: the reply leaves when the work is done\n",
            ),
        ),
        tests=(
            f"{SECURE_ROUND}::"
            "test_a_masked_input_leaves_at_the_holders_fixed_time_whatever_its_records",
        ),
    ),
    Mutant(
        name="charge-outside-one-transaction",
        summary="a holder's cap check and charge run in a deferred transaction (two set-ups at "
        "once both pass the lifetime cap)",
        patches=(
            Patch(
                "client/budget.py",
                "        with self._transaction(self.path, write=True) as db:\n"
                "            return self._charge(db, task_id, privacy, wanted, check, "
                "repeat=repeat)\n",
                "        with self._transaction(self.path, write=False) as db:  # mutant: BEGIN\n"
                "            return self._charge(db, task_id, privacy, wanted, check, "
                "repeat=repeat)\n",
            ),
        ),
        tests=("tests/client/test_budget_mutants.py::test_two_charges_at_once_see_each_other",),
    ),
    Mutant(
        name="commit-charges-no-store",
        summary="a dataset-vector holder's commit charges a budget that keeps nothing",
        patches=(
            Patch(
                "client/contributor.py",
                "        ClientBudget(self.settings.budget_path).charge(\n",
                "        ClientBudget(None).charge(  # mutant: nothing is recorded\n",
            ),
        ),
        tests=(
            "tests/client/test_contributor_setup.py::test_the_commit_charges_this_holders_store",
            "tests/client/test_budget.py::"
            "test_two_processes_setting_up_two_tasks_at_once_cannot_overspend",
        ),
    ),
    Mutant(
        name="reload-forgets-colluders",
        summary="a holder reloading its round state checks the threshold for no colluders",
        patches=(
            Patch(
                "client/participant.py",
                "            roster=roster,\n            max_colluders=self._colluders(task),\n"
                "        )\n        return task, payload, client\n",
                "            roster=roster,  # mutant: the colluder bound is dropped\n"
                "        )\n        return task, payload, client\n",
            ),
        ),
        tests=(
            "tests/client/test_participant_mutants.py::"
            "test_a_stricter_colluder_bound_holds_at_every_later_stage",
        ),
    ),
    Mutant(
        name="gdp-factor-understated",
        summary="the Skellam GDP certificate's factor 1 % too small (less noise than needed)",
        patches=(
            Patch(
                "protocol/skellam_gdp.py",
                "factor = sigma * max(centre, tail) * (1.0 + FLOAT_MARGIN)",
                "factor = sigma * max(centre, tail) * (1.0 + FLOAT_MARGIN) * 0.99",
            ),
        ),
        tests=(
            f"{SKELLAM_GDP}::test_certificate_is_never_below_the_exact_loss_and_tight_with_enough_noise",
            f"{SKELLAM_GDP}::test_calibrated_variance_is_the_smallest_the_certificate_proves",
        ),
    ),
    Mutant(
        name="gdp-ignores-compositions",
        summary="the Skellam GDP certificate counts k releases (PE rounds) as one",
        patches=(
            Patch(
                "protocol/skellam_gdp.py",
                "return factor * float(l2) * math.sqrt(compositions) / math.sqrt(float(variance))",
                "return factor * float(l2) / math.sqrt(float(variance))",
            ),
        ),
        tests=(f"{SKELLAM_GDP}::test_certificate_bounds_a_spread_shift_and_composed_releases",),
    ),
)


# --------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------


def patched_text(text: str, patch: Patch) -> str:
    """Return ``text`` with ``patch`` applied.

    Raises:
        PatchError: If ``patch.old`` does not occur exactly once, or equals ``patch.new``.
    """
    count = text.count(patch.old)
    if count != 1:
        raise PatchError(
            f"{patch.path}: snippet {patch.old.strip()!r} found {count} times, expected exactly "
            "once; update the mutant to the current source"
        )
    if patch.old == patch.new:
        raise PatchError(f"{patch.path}: snippet {patch.old.strip()!r} is replaced by itself")
    return text.replace(patch.old, patch.new)


def apply_patches(root: Path, patches: Iterable[Patch]) -> None:
    """Apply every patch to the files under ``root`` (PatchError if a snippet does not match)."""
    for patch in patches:
        path = root / patch.path
        text = path.read_text(encoding="utf-8")
        path.write_text(patched_text(text, patch), encoding="utf-8")


def check_mutants(root: Path, mutants: Sequence[Mutant] = MUTANTS) -> list[str]:
    """Problems that would make a mutant test nothing; an empty list means all is well.

    Checks that names are unique, every snippet occurs exactly once in ``root``'s source
    (applied in order, so two patches of one file see each other's result), and every
    selected test function exists in its test file.
    """
    problems: list[str] = []
    names = [m.name for m in mutants]
    problems += [
        f"mutant name {n!r} is used twice" for n in sorted({n for n in names if names.count(n) > 1})
    ]
    for mutant in mutants:
        texts: dict[str, str] = {}
        for patch in mutant.patches:
            path = root / patch.path
            if not path.is_file():
                problems.append(f"{mutant.name}: {patch.path} does not exist")
                continue
            text = texts.get(patch.path) or path.read_text(encoding="utf-8")
            try:
                texts[patch.path] = patched_text(text, patch)
            except PatchError as exc:
                problems.append(f"{mutant.name}: {exc}")
        if not mutant.tests:
            problems.append(f"{mutant.name}: no tests selected")
        for node in mutant.tests:
            file, _, function = node.partition("::")
            function = function.split("[", 1)[0]  # a parametrized case names its function
            path = root / file
            if not path.is_file() or f"def {function}(" not in path.read_text(encoding="utf-8"):
                problems.append(f"{mutant.name}: test {node} does not exist")
    return problems


# --------------------------------------------------------------------------------------------
# Copies and runs
# --------------------------------------------------------------------------------------------

_GUARD_SOURCE = '''\
"""pytest plugin: record where every loaded fedsynth module came from."""

import json
import os
import sys


def pytest_sessionfinish(session, exitstatus):
    root = os.path.realpath(os.environ["PRIVACY_MUTANT_ROOT"])
    loaded, outside = [], []
    for name, module in sorted(sys.modules.items()):
        if name != "fedsynth" and not name.startswith("fedsynth."):
            continue
        paths = [getattr(module, "__file__", None) or ""]
        paths += list(getattr(module, "__path__", []) or [])
        loaded.append(name)
        for path in paths:
            if path and not os.path.realpath(path).startswith(root + os.sep):
                outside.append(f"{name}: {path}")
    with open(os.environ["PRIVACY_MUTANT_GUARD_OUT"], "w", encoding="utf-8") as handle:
        json.dump({"loaded": loaded, "outside": outside}, handle)
'''


def source_files(root: Path = ROOT) -> list[str]:
    """Tracked files plus untracked files git does not ignore, that exist on disk."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.decode("utf-8")
    return sorted({name for name in listed.split("\0") if name and (root / name).is_file()})


def make_copy(target: Path, root: Path = ROOT) -> Path:
    """Copy the working tree into ``target`` and build the import staging directory there.

    Returns:
        The staging directory to put first on ``PYTHONPATH``.
    """
    for name in source_files(root):
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, destination, follow_symlinks=False)
    stage = target / STAGE
    package = stage / "fedsynth"
    package.mkdir(parents=True)
    # A regular package (not a namespace one), so fedsynth.__path__ is this directory only and
    # the editable install's finder is never asked for fedsynth.<role>.
    (package / "__init__.py").write_text('"""Staged copy under test."""\n', encoding="utf-8")
    for role in ROLES:
        (package / role).symlink_to(target / role, target_is_directory=True)
    (stage / f"{GUARD}.py").write_text(_GUARD_SOURCE, encoding="utf-8")
    return stage


@dataclass(frozen=True)
class RunResult:
    """Outcome of one pytest run in a copy."""

    status: str  # "passed", "failed", "broken"
    failed: tuple[str, ...]
    summary: str
    seconds: float
    detail: str


def _summary_line(output: str) -> str:
    """The final count line of pytest ("3 passed, 1 failed in 4.2s"), without decoration."""
    pattern = re.compile(r"\d+ (passed|failed|error|errors|skipped|deselected)\b")
    lines = [line.strip("= ") for line in output.splitlines() if pattern.search(line)]
    return lines[-1] if lines else ""


def run_selection(
    copy: Path, stage: Path, tests: Sequence[str], *, timeout: int, stop_first: bool = True
) -> RunResult:
    """Run ``tests`` with pytest in ``copy`` importing the copy's code; classify the outcome.

    With ``stop_first`` (pytest ``-x``) the run ends at the first failing test; without it,
    every selected test runs and every failing one is reported.
    """
    guard_out = copy / ".privacy-mutant-guard.json"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"PYTHONPATH", "PYTEST_ADDOPTS", "PYTHONSTARTUP"}
    }
    env.update(
        PYTHONPATH=str(stage),
        PYTHONDONTWRITEBYTECODE="1",
        PRIVACY_MUTANT_ROOT=str(copy),
        PRIVACY_MUTANT_GUARD_OUT=str(guard_out),
    )
    stop = ["-x"] if stop_first else []
    command = [sys.executable, "-m", "pytest", *stop, *PYTEST_ARGS, "-p", GUARD, *tests]
    start = time.monotonic()
    try:
        done = subprocess.run(
            command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        seconds = time.monotonic() - start
        return RunResult("broken", (), f"timed out after {timeout} s", seconds, "")
    seconds = time.monotonic() - start
    output = done.stdout + done.stderr
    failed = tuple(
        line.split(" ", 2)[1]
        for line in output.splitlines()
        if line.startswith(("FAILED ", "ERROR ")) and "::" in line.split(" ", 2)[1]
    )
    summary = _summary_line(output)
    if not guard_out.is_file():
        return RunResult("broken", failed, summary or "no guard report", seconds, output)
    guard = json.loads(guard_out.read_text(encoding="utf-8"))
    guard_out.unlink()
    if guard["outside"] or not guard["loaded"]:
        where = "; ".join(guard["outside"][:5]) or "no fedsynth module was imported"
        return RunResult("broken", failed, f"code not from the copy: {where}", seconds, output)
    if done.returncode == 0:
        return RunResult("passed", (), summary, seconds, output)
    if done.returncode == 1 and failed:
        return RunResult("failed", failed, summary, seconds, output)
    return RunResult("broken", failed, f"pytest exit {done.returncode}: {summary}", seconds, output)


@dataclass(frozen=True)
class MutantOutcome:
    """What happened to one mutant."""

    mutant: Mutant
    verdict: str  # "KILLED", "SURVIVED", "BROKEN"
    run: RunResult


def run_mutant(mutant: Mutant, *, timeout: int, keep: bool, stop_first: bool) -> MutantOutcome:
    """Copy the tree, apply the mutant's patches, run its selection."""
    base = Path(tempfile.mkdtemp(prefix=f"privacy-mutant-{mutant.name}-"))
    try:
        copy = base / "repo"
        stage = make_copy(copy)
        apply_patches(copy, mutant.patches)
        result = run_selection(copy, stage, mutant.tests, timeout=timeout, stop_first=stop_first)
    finally:
        if keep:
            print(f"   kept {base}", flush=True)
        else:
            shutil.rmtree(base, ignore_errors=True)
    verdict = {"failed": "KILLED", "passed": "SURVIVED"}.get(result.status, "BROKEN")
    return MutantOutcome(mutant=mutant, verdict=verdict, run=result)


def run_control(mutants: Sequence[Mutant], *, timeout: int) -> RunResult:
    """Run the union of the selections on an unpatched copy; it must pass."""
    tests = list(dict.fromkeys(node for mutant in mutants for node in mutant.tests))
    with tempfile.TemporaryDirectory(prefix="privacy-mutant-control-") as base:
        copy = Path(base) / "repo"
        stage = make_copy(copy)
        return run_selection(copy, stage, tests, timeout=timeout)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _short(node: str) -> str:
    file, _, rest = node.partition("::")
    return f"`{Path(file).name}::{rest}`"


def _killers(failed: Sequence[str]) -> str:
    """Failing tests, one per function, with the number of failing parametrizations."""
    counts: dict[str, int] = {}
    for node in failed:
        function = node.split("[", 1)[0]
        counts[function] = counts.get(function, 0) + 1
    return "<br>".join(
        _short(function) + (f" ({count} cases)" if count > 1 else "")
        for function, count in counts.items()
    )


def markdown_table(
    control: RunResult, outcomes: Sequence[MutantOutcome], *, stop_first: bool = True
) -> str:
    """The result table in Markdown."""
    order = "in order, `-x`" if stop_first else "all of them"
    killed_by = "killed by" if stop_first else "every test that fails"
    rows = [
        f"| mutant | what it breaks | tests run ({order}) | result | {killed_by} | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for outcome in outcomes:
        mutant, run = outcome.mutant, outcome.run
        files = sorted({Path(p.path).as_posix() for p in mutant.patches})
        what = f"{mutant.summary} ({', '.join(f'`{f}`' for f in files)})"
        tests = "<br>".join(_short(node) for node in mutant.tests)
        killer = _killers(run.failed) or "—"
        rows.append(
            f"| `{mutant.name}` | {what} | {tests} | {outcome.verdict} | {killer} | "
            f"{run.seconds:.0f} |"
        )
    rows.append(
        f"| control (no patch) | — | all of the above | {control.status.upper()} "
        f"({control.summary}) | — | {control.seconds:.0f} |"
    )
    return "\n".join(rows) + "\n"


def list_mutants(mutants: Sequence[Mutant]) -> None:
    """Print every mutant with its patches and tests."""
    for mutant in mutants:
        print(f"{mutant.name}: {mutant.summary}")
        for patch in mutant.patches:
            print(f"  patch {patch.path}:")
            print(textwrap.indent(f"- {patch.old.rstrip()}\n+ {patch.new.rstrip()}", "    "))
        for node in mutant.tests:
            print(f"  test  {node}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the control and the named mutants; print the table; 0 only if every mutant died."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--check", action="store_true", help="only check that the patches match")
    parser.add_argument("--keep", action="store_true", help="keep each mutant's copy")
    parser.add_argument(
        "--all-failures",
        action="store_true",
        help="run each mutant's whole selection (no -x) and report every test that fails",
    )
    parser.add_argument("--timeout", type=int, default=TIMEOUT_S, help="seconds per pytest run")
    parser.add_argument("--markdown", type=Path, help="also write the result table to this file")
    args = parser.parse_args(argv)

    known = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown mutant(s) {unknown}; known: {sorted(known)}")
    selected = [known[n] for n in args.names] if args.names else list(MUTANTS)
    if args.list:
        list_mutants(selected)
        return 0
    problems = check_mutants(ROOT, selected)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    if args.check:
        print(f"{len(selected)} mutants: every snippet matches once, every test exists")
        return 0

    print(f"== control: unpatched copy, {len(selected)} selections", flush=True)
    control = run_control(selected, timeout=args.timeout)
    print(f"   {control.status} ({control.summary}) in {control.seconds:.0f} s", flush=True)
    if control.status != "passed":
        print(control.detail[-6000:], file=sys.stderr)
        print(
            "the unpatched copy does not pass the selections: no mutant result would mean anything",
            file=sys.stderr,
        )
        return 2
    outcomes = []
    for mutant in selected:
        print(f"== {mutant.name}: {mutant.summary}", flush=True)
        outcome = run_mutant(
            mutant, timeout=args.timeout, keep=args.keep, stop_first=not args.all_failures
        )
        outcomes.append(outcome)
        killer = ", ".join(outcome.run.failed) or "-"
        print(
            f"   {outcome.verdict} in {outcome.run.seconds:.0f} s ({outcome.run.summary}); "
            f"killed by: {killer}",
            flush=True,
        )
        if outcome.verdict == "BROKEN":
            print(outcome.run.detail[-4000:], file=sys.stderr)
    table = markdown_table(control, outcomes, stop_first=not args.all_failures)
    print()
    print(table)
    if args.markdown:
        args.markdown.write_text(table, encoding="utf-8")
    alive = [o.mutant.name for o in outcomes if o.verdict != "KILLED"]
    if alive:
        print(f"not killed: {', '.join(alive)}", file=sys.stderr)
        return 1
    print(f"all {len(outcomes)} named privacy mutants killed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
