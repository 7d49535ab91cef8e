"""The hivemind internals this project relies on, pinned: a test that fails loudly, naming the method, when the
installed hivemind's version of one of them changes (a later 1.1.x installed without constraints.txt could
otherwise break averaging or signing silently).

Each entry is a method we override or call although it is private, or public code whose behaviour our override
depends on, with the sha256 of its source (first 16 hex digits) in hivemind 1.1.12, and where we rely on it.
After an upgrade: read the new source of each failing entry, adapt the code named, then update its digest.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect

import hivemind
import pytest

TESTED_VERSION = "1.1.12"

PINNED = {
    # peer/stage/hivemind_ext.py: StageStateAverager
    "hivemind.optim.state_averager.TrainingStateAverager.__init__": ("97f573400a46cdf9", "allow_state_sharing kwarg"),
    "hivemind.optim.state_averager.TrainingStateAverager.load_state_from_peers":
        ("e4d647a9ea78cde8", "last_download_ok wraps it"),
    "hivemind.optim.state_averager.TrainingStateAverager._update_scheduler":
        ("9b8de2a7b6020122", "called last after an accepted download; load_main_parameters calls it"),
    "hivemind.averaging.averager.DecentralizedAverager._load_state_from_peers":
        ("fe7b419d01ced5fe", "overridden to refuse non-finite states (fills an MPFuture stand-in)"),
    "hivemind.averaging.averager.DecentralizedAverager.rpc_download_state":
        ("fd2f6f19e7d247af", "overridden to serve one upload at a time"),
    "hivemind.p2p.servicer.ServicerBase._get_handle_name": ("d3e13c74c5e52049", "handler names kept stock"),
    "hivemind.p2p.servicer.ServicerBase.get_stub":
        ("f3e329ffb8ac53b0", "overridden to refuse donors no stage record names (called on the class too)"),
    "hivemind.averaging.averager.DecentralizedAverager._load_state_from_peers#donors":
        ("fe7b419d01ced5fe", "asks get_stub for each declared donor, best priority first, skipping one that fails"),
    # peer/stage/hivemind_ext.py: StageProgressTracker
    "hivemind.optim.progress_tracker.ProgressTracker._parse_swarm_progress_data":
        ("1b5ad87469d3c13f", "overridden to count only the stage's replicas' records"),
    "hivemind.optim.progress_tracker.ProgressTracker.__init__":
        ("55e199febc14d4f6", "_local_public_key: the subkey of our progress and digest records"),
    "hivemind.optim.optimizer.Optimizer._make_progress_tracker":
        ("a3fe70a367d732d6", "its arguments are repeated in our override"),
    # peer/stage/hivemind_ext.py: GroupSizedGradientAverager
    "hivemind.optim.grad_averager.GradientAverager.__init__": ("9f7a702bd6f3dee5", "subclassed"),
    "hivemind.optim.grad_averager.GradientAverager.step": ("9d556a76d4a889cf", "weight of an empty replica"),
    "hivemind.averaging.averager.DecentralizedAverager._run_internal":
        ("8f85686e1ccd3eb0", "_outer_pipe commands dispatched by method name"),
    "hivemind.averaging.matchmaking.Matchmaking.__init__": ("40dea3076c716ee9", "target_group_size attribute"),
    "hivemind.averaging.matchmaking.PotentialLeaders.__init__": ("771f44b6230eb9e1", "target_group_size attribute"),
    "hivemind.averaging.averager.DecentralizedAverager.rpc_join_group":
        ("a0c1dec1f5165713", "overridden to turn away non-members (then delegates to matchmaking)"),
    "hivemind.averaging.matchmaking.Matchmaking._request_join_group":
        ("df823040a94d1c1d", "a follower turned away (any code but ACCEPTED) goes on to its next leader"),
    "hivemind.averaging.averager.DecentralizedAverager._aggregate_with_group":
        ("c297d8a435ce2b1c", "overridden to refuse a group holding non-members"),
    "hivemind.averaging.averager.DecentralizedAverager._step":
        ("dfbb4416e9ebba51", "calls _aggregate_with_group per round; an AllreduceException fails or retries it"),
    "hivemind.averaging.averager.DecentralizedAverager.rpc_aggregate_part":
        ("06ad9597d5884df8", "overridden to clamp the weight in a group-mate's messages (then delegates)"),
    "hivemind.averaging.allreduce.AllReduceRunner._accumulate_parts_streaming":
        ("6c5a3c7266060303", "takes each sender's weight from its AveragingData messages"),
    # peer/stage/hivemind_ext.py: StageCollaborationOptimizer
    "hivemind.optim.optimizer.Optimizer.__init__": ("310edba41646edad", "grad_averager_factory, averager_opts"),
    "hivemind.optim.optimizer.Optimizer._make_gradient_averager": ("b9a4450197c1e6fb", "overridden (averager_opts)"),
    "hivemind.optim.optimizer.Optimizer._make_state_averager":
        ("59a43eff001c3284", "its arguments are repeated in our override"),
    "hivemind.optim.optimizer.Optimizer._begin_averaging_gradients": ("f17d8bb258a0c551", "replaced"),
    "hivemind.optim.optimizer.Optimizer._average_gradients_and_load_into_optimizer":
        ("d95bb5ebc061749e", "wrapped to read the group size"),
    "hivemind.optim.optimizer.Optimizer._update_global_epoch": ("03a36523a3fce65e", "refresh_global_epoch calls it"),
    # dht/signing.py
    "hivemind.dht.crypto.RSASignatureValidator.sign_value": ("8bb67ec0d7423213", "KeyringValidator replaces it"),
    "hivemind.dht.crypto.RSASignatureValidator._serialize_record": ("cdc8c54947985d13", "KeyringValidator signs"),
    "hivemind.utils.crypto.RSAPrivateKey.__setstate__": ("bdf8b31594bf2615", "load_or_create_key reads a key file"),
    "hivemind.utils.crypto.RSAPrivateKey.__getstate__": ("010e25c7cfd5d12b", "the key file's format"),
    # dht/admission.py: InviteAuthorizer
    "hivemind.utils.auth.TokenAuthorizerBase.refresh_token_if_needed":
        ("7df50e54aed10d87", "overridden: our own invitation, never asserted valid"),
    "hivemind.utils.auth.TokenAuthorizerBase.validate_request":
        ("168681451ff9be1e", "checks the token with is_token_valid, the signature with the token's key, time, nonce"),
    # dht/owner.py
    "hivemind.p2p.p2p_daemon.P2P.generate_identity":
        ("6310daf4f73d3f35", "an RSA identity in a libp2p PrivateKey protobuf: load_identity reads it"),
}


def resolve(path: str):
    module_name, cls_name, attr = path.split("#")[0].rsplit(".", 2)  # "#...": a second reason to pin it
    cls = getattr(importlib.import_module(module_name), cls_name)
    return inspect.unwrap(getattr(cls, attr))


def digest(path: str) -> str:
    return hashlib.sha256(inspect.getsource(resolve(path)).encode()).hexdigest()[:16]


def test_the_installed_hivemind_is_the_tested_one():
    assert hivemind.__version__ == TESTED_VERSION, (
        f"hivemind {hivemind.__version__} is installed; this project is tested with {TESTED_VERSION} "
        f"(install with -c constraints.txt)")


@pytest.mark.parametrize("path", sorted(PINNED))
def test_a_hivemind_internal_we_rely_on_is_unchanged(path):
    expected, why = PINNED[path]
    got = digest(path)
    assert got == expected, (f"hivemind {hivemind.__version__} changed {path} (we rely on it: {why}); read its "
                             f"source, adapt peer/stage/hivemind_ext.py, dht/signing.py, dht/owner.py or "
                             f"dht/admission.py, then pin {got} here")


def test_the_signature_format_we_write_is_hivemind_s():
    from hivemind.dht.crypto import RSASignatureValidator

    assert RSASignatureValidator.SIGNATURE_FORMAT == b"[signature:_value_]"
    assert RSASignatureValidator._SIGNATURE_RE.pattern == rb"\[signature:(.+?)\]"
