"""The checks `raytp serve` and Serve's app builder run before any process starts (check_model), which the engine
runs too (checked_model_args): each bad setting is one ValueError naming the field and its value, or the path."""
import pytest

from raytp.config import EngineConfig
from raytp.engine.model_check import check_model, checked_model_args
from raytp.model.checkpoint_error import CheckpointError
from raytp.model.pipeline import PipelineError
from tests.helpers import write_llama

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("check"))  # 2 layers, 4 heads, 2 KV heads, 256 positions


def _config(checkpoint, **settings) -> EngineConfig:
    return EngineConfig.parse(dict(model=checkpoint, device="cpu", **settings))


def test_a_model_that_fits_its_settings_passes_and_gives_its_args(checkpoint):
    check_model(_config(checkpoint, tensor_parallel_size=2, max_model_len=256), remote_ok=False)
    args = checked_model_args(_config(checkpoint), checkpoint)
    assert (args.num_layers, args.max_position_embeddings) == (2, 256)


@pytest.mark.parametrize("settings, error, names", [
    (dict(max_model_len=4096), ValueError, "max_model_len=4096 is larger than the model's max_position_embeddings=256"),
    (dict(tensor_parallel_size=3), CheckpointError, "tensor_parallel_size=3"),
    (dict(pipeline_parallel_size=3), PipelineError, "pipeline_parallel_size=3 is larger than the model's 2 layers"),
])
def test_a_setting_the_model_does_not_fit_is_refused_before_anything_starts(checkpoint, settings, error, names):
    with pytest.raises(error) as err:
        check_model(_config(checkpoint, **settings), remote_ok=False)
    assert names in str(err.value)
    if error is CheckpointError:
        assert checkpoint in str(err.value)


def test_joining_a_cluster_a_path_missing_here_is_left_to_its_nodes(tmp_path):
    check_model(_config(str(tmp_path / "on-the-cluster-only")), remote_ok=True)
