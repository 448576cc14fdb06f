"""Models as users bring them: where the batch is, lists of samples, a batch factory, a dataset with
a collate function, encoder-decoder generation, detection training, BatchNorm training.

Each real-model test searches the exact maximum batch on the CPU device under a small budget, then
checks it against an independent measurement: the step written out by hand, the batch built by
hand, its peak counted by a fresh ``LiveMemory`` tracker (weights, gradients and optimizer state
resident): the maximum fits the budget and one sample more does not.
"""

from __future__ import annotations

import pytest

from pytest_autobatch import Samples
from pytest_autobatch.arguments import check_call, check_marker
from pytest_autobatch.errors import ConfigError

torch = pytest.importorskip("torch")

from pytest_autobatch.devices.torch_devices import CpuDevice  # noqa: E402
from pytest_autobatch.devices.torch_memory import LiveMemory, state_tensors  # noqa: E402
from pytest_autobatch.devices.torch_timing import FAST  # noqa: E402
from pytest_autobatch.search import find_max_batch  # noqa: E402

MIB = 1 << 20


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the suite runs under xdist on two cores
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def search(model, example=None, *, budget, mode="inference", cap=512, **options):
    """The maximum batch the plugin's search finds on the CPU device under ``budget``."""
    device = CpuDevice(budget)
    workload = device.workload(model, example, mode=mode, timing=FAST, **options)
    try:
        result = find_max_batch(workload.probe, cap=cap, capacity_bytes=budget, min_batch=workload.min_batch)
    finally:
        workload.close()
    return workload, result


def call(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def total_loss(output):
    values = list(output.values()) if isinstance(output, dict) else [output]
    total = values[0].sum()
    for value in values[1:]:
        total = total + value.sum()
    return total


class Independent:
    """Peak bytes of one step at a batch, written out by hand: the reference the search must match."""

    def __init__(self, model, build, *, mode="inference", warm_batch=1, run=None):
        self.model, self.build, self.mode, self.run = model, build, mode, run
        self.optimizer = None
        if mode == "train":
            model.train()
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
            self._train(build(warm_batch))   # optimizer state and gradients, as in steady training
        else:
            model.eval()

    def _train(self, inputs):
        self.optimizer.zero_grad(set_to_none=True)
        total_loss(call(self.model, inputs)).backward()
        self.optimizer.step()

    def peak(self, batch):
        tracker = LiveMemory()
        tracker.track(state_tensors(self.model, self.optimizer))
        with tracker:
            inputs = self.build(batch)
            if self.mode == "train":
                self._train(inputs)
            else:
                with torch.inference_mode():
                    (self.run or call)(self.model, inputs)
        return tracker.peak_bytes

    def check(self, maximum, budget, cap=512):
        """The maximum fits the budget and one sample more does not (unless the maximum is the cap)."""
        assert self.peak(maximum) <= budget
        if maximum < cap:
            assert self.peak(maximum + 1) > budget


def rows(tensor, batch):
    """``batch`` copies of a one-sample tensor, as fresh memory."""
    return tensor.expand(batch, *tensor.shape[1:]).clone()


# --- where the batch is -----------------------------------------------------------------------------

def test_lstm_example_searched_along_dim_0_is_refused_naming_the_shapes_and_the_option():
    lstm = torch.nn.LSTM(32, 64)
    with pytest.raises(ConfigError) as caught:
        CpuDevice(64 * MIB).workload(lstm, torch.randn(20, 1, 32))
    message = str(caught.value)
    assert "LSTM" in message and "[20, 1, 32]" in message and "batch_dim=1" in message
    assert "batch_dim=0 to confirm" in message


def test_lstm_with_batch_dim_1_searches_samples_not_sequence_steps():
    lstm = torch.nn.LSTM(32, 64)
    budget = MIB // 2
    workload, result = search(lstm, torch.randn(20, 1, 32), budget=budget, batch_dim=1)
    assert workload.fingerprint()["inputs"] == {"shape": [20, 32], "dtype": "float32", "batch_dim": 1}
    x = torch.randn(20, 1, 32)
    Independent(lstm, lambda b: x.expand(20, b, 32).clone()).check(result.max_batch, budget)


def test_batch_dim_per_input_for_a_dict_and_a_tuple():
    class Seq(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = torch.nn.GRU(8, 16)

        def forward(self, x, h):
            return self.gru(x, h)[0]

    model = Seq()
    example = (torch.randn(5, 1, 8), torch.randn(1, 1, 16))
    workload = CpuDevice(64 * MIB).workload(model, example, batch_dim=(1, 1))
    assert workload.source.build(4)[0].shape == (5, 4, 8) and workload.source.build(4)[1].shape == (1, 4, 16)
    with pytest.raises(ConfigError, match=r"batch_dim=3 is outside example input\[1\] of shape \[1, 1, 16\]"):
        CpuDevice().workload(model, example, batch_dim=(1, 3))
    with pytest.raises(ConfigError, match=r"inputs disagree on the batch size: .*\[0\] of shape \[5, 1, 8\] "
                                          r"\(batch dimension 0: 5\).*batch_dim"):
        CpuDevice().workload(model, example, batch_dim=0)
    with pytest.raises(ConfigError, match=r"batch_dim names 'y', not among the keys"):
        CpuDevice().workload(torch.nn.Linear(4, 2), {"input": torch.zeros(1, 4)}, batch_dim={"y": 0})
    with pytest.raises(ConfigError, match=r"batch_dim='first': give an int"):
        CpuDevice().workload(torch.nn.Linear(4, 2), torch.zeros(1, 4), batch_dim="first")


def test_dict_inputs_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertModel(config)
    ids = torch.randint(1, 100, (1, 32))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    budget = 1 * MIB
    _, result = search(model, example, budget=budget)
    assert 4 < result.max_batch < 512
    Independent(model, lambda b: {key: rows(value, b) for key, value in example.items()}).check(
        result.max_batch, budget)


# --- lists of samples: detection ------------------------------------------------------------------------

def _detector():
    """torchvision's fasterrcnn_mobilenet_v3_large_320_fpn at CPU size: 64x64 images, few proposals, a
    small box head (the stock one is 13M parameters of the 19M)."""
    detection = pytest.importorskip("torchvision.models.detection")
    return small_detector(detection)


def small_detector(detection):
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64,
        rpn_pre_nms_top_n_test=64, rpn_post_nms_top_n_test=32, rpn_pre_nms_top_n_train=64,
        rpn_post_nms_top_n_train=32, box_batch_size_per_image=32)
    model.roi_heads.box_head = TwoMLPHead(256 * 7 * 7, 64)
    model.roi_heads.box_predictor = FastRCNNPredictor(64, 3)
    return model


def _image_and_target():
    image = torch.rand(3, 64, 64)
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}
    return image, target


def test_list_of_images_is_refused_with_a_fix_when_given_as_a_plain_list():
    class Normalize(torch.nn.Module):   # as torchvision's detection transform: per-image, 3 channels
        def forward(self, images):
            mean = torch.tensor([0.5, 0.5, 0.5])
            return torch.stack([image - mean[:, None, None] for image in images])

    image = torch.rand(3, 16, 16)
    with pytest.raises(ConfigError, match=r"Normalize runs at batch \d but fails at batch \d, with the batch "
                                          r"taken as input\[0\]\[0\] of shape \[\d, 16, 16\].*Samples\(\[\.\.\.\]\)"):
        CpuDevice().workload(Normalize(), ([image],))
    workload = CpuDevice().workload(Normalize(), Samples([image]))
    assert len(workload.source.build(5)) == 5


@pytest.mark.slow
def test_detection_eval_on_a_list_of_images():
    model = _detector()
    image, _ = _image_and_target()
    budget = 64 * MIB
    workload, result = search(model, Samples([image]), budget=budget, cap=64)
    assert workload.fingerprint()["inputs"] == {"samples": [{"shape": [3, 64, 64], "dtype": "float32"}]}
    assert 1 < result.max_batch < 64
    Independent(model, lambda b: [image.clone() for _ in range(b)]).check(result.max_batch, budget, cap=64)


@pytest.mark.slow
def test_detection_train_with_a_list_of_target_dicts():
    model = _detector()
    image, target = _image_and_target()
    budget = 112 * MIB
    _, result = search(model, (Samples([image]), Samples([target])), mode="train", budget=budget, cap=16)
    assert 1 < result.max_batch < 16

    def build(batch):
        return ([image.clone() for _ in range(batch)],
                [{key: value.clone() for key, value in target.items()} for _ in range(batch)])
    Independent(model, build, mode="train").check(result.max_batch, budget, cap=16)


# --- a batch factory and a dataset ---------------------------------------------------------------------

def _cnn():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))


def test_batch_factory():
    model = _cnn()

    def make_batch(batch):
        return torch.rand(batch, 3, 32, 32)

    budget = 2 * MIB
    workload, result = search(model, make_batch=make_batch, budget=budget)
    assert workload.fingerprint()["inputs"]["make_batch"].endswith("make_batch")
    Independent(model, make_batch).check(result.max_batch, budget)


def test_batch_factory_returning_another_batch_size_is_refused():
    with pytest.raises(ConfigError, match=r"Sequential: make_batch\(2\) returned a batch of 1, not 2 "
                                          r"\(make_batch\(2\) of shape \[1, 3, 8, 8\].*exactly 2 samples"):
        CpuDevice().workload(_cnn(), make_batch=lambda batch: torch.rand(1, 3, 8, 8), min_batch=2)
    with pytest.raises(ConfigError, match="give one of an example input, make_batch or dataset"):
        CpuDevice().workload(_cnn(), torch.rand(1, 3, 8, 8), make_batch=lambda batch: torch.rand(batch, 3, 8, 8))


class Tokens(torch.utils.data.Dataset):
    """Token sequences of different lengths; the longest are the last."""

    def __init__(self, lengths):
        generator = torch.Generator().manual_seed(0)
        self.samples = [torch.randint(1, 100, (length,), generator=generator) for length in lengths]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def pad(samples):
    length = max(len(sample) for sample in samples)
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for row, sample in enumerate(samples):
        ids[row, :len(sample)] = sample
        mask[row, :len(sample)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=128)
    return transformers.BertModel(config)


def test_dataset_with_collate_searches_the_largest_samples_first():
    model = _bert()
    lengths = [8] * 200 + [64] * 200
    dataset = Tokens(lengths)
    budget = 2 * MIB
    largest = list(range(200, 400))
    workload, result = search(model, dataset=dataset, collate_fn=pad, largest=largest, budget=budget)
    assert workload.fingerprint()["inputs"]["batch"]["input_ids"]["shape"] == [64]
    Independent(model, lambda b: pad([dataset[i] for i in largest[:b]])).check(result.max_batch, budget)
    _, short_first = search(model, dataset=dataset, collate_fn=pad, budget=budget)
    assert short_first.max_batch > result.max_batch, "the short samples would claim a batch that does not fit"
    by_size = search(model, dataset=dataset, collate_fn=pad, largest=len, budget=budget)[1]
    assert by_size.max_batch == result.max_batch


def test_dataset_smaller_than_the_batch_caps_the_search_and_says_so(tmp_path):
    from pytest_autobatch.session import AutobatchSession, Settings
    session = AutobatchSession(Settings(baselines=tmp_path, device="cpu", memory_budget=64 * MIB,
                                        steady_pause_s=0.0))
    dataset = [torch.rand(4) for _ in range(6)]
    result = session.run("test_x.py::test_small", torch.nn.Linear(4, 2), dataset=dataset, timing=FAST)
    assert result.max_batch == 6 and result.entry["cap"] == 6
    assert any("the dataset has 6 samples" in message and "capped at 6" in message
               for message in session.messages)


def test_failing_collate_names_the_model_the_function_and_the_samples():
    dataset = Tokens([4, 8, 12])

    def stack(samples):
        return torch.stack(samples)

    with pytest.raises(ConfigError, match=r"BertModel: collate_fn \(.*stack\) failed on 2 samples \(dataset "
                                          r"indices \[0, 1\]\): RuntimeError: .*pad variable-length samples"):
        CpuDevice().workload(_bert(), dataset=dataset, collate_fn=stack)
    with pytest.raises(ConfigError, match=r"largest: \[7\] are not indices of the dataset of 3 samples"):
        CpuDevice().workload(_bert(), dataset=dataset, collate_fn=pad, largest=[7])


# --- every mode -------------------------------------------------------------------------------------

def test_encoder_decoder_generate_t5():
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = transformers.T5ForConditionalGeneration(config)
    ids = torch.randint(2, 64, (1, 16))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    budget = 1 * MIB
    workload, result = search(model, example, mode="generate", max_new_tokens=4, budget=budget)
    assert workload.fingerprint()["mode"] == "generate" and result.max_batch > 1

    def run(model, inputs):
        return model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    Independent(model, lambda b: {key: rows(value, b) for key, value in example.items()}, run=run).check(
        result.max_batch, budget)


def _bn_net():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2),
                               torch.nn.BatchNorm1d(2))


def test_batchnorm_training_starts_at_the_smallest_batch_the_model_takes():
    model = _bn_net()
    budget = 4 * MIB
    workload, result = search(model, torch.rand(2, 3, 32, 32), mode="train", budget=budget)
    assert workload.min_batch == 2 and result.probes[0].batch == 2
    assert workload.fingerprint()["min_batch"] == 2
    x = torch.rand(1, 3, 32, 32)
    Independent(model, lambda b: rows(x, b), mode="train", warm_batch=2).check(result.max_batch, budget)
    option = CpuDevice(budget).workload(_bn_net(), torch.rand(1, 3, 32, 32), mode="train", min_batch=2)
    assert option.min_batch == 2
    with pytest.raises(ConfigError, match="Expected more than 1 value per channel.*min_batch=2"):
        CpuDevice(budget).workload(_bn_net(), torch.rand(1, 3, 32, 32), mode="train")


def test_autocast_is_stated_in_the_fingerprint():
    workload = CpuDevice().workload(_cnn(), torch.rand(1, 3, 8, 8), autocast="bf16")
    assert workload.fingerprint()["autocast"] == "bfloat16"
    assert CpuDevice().workload(_cnn(), torch.rand(1, 3, 8, 8)).fingerprint()["autocast"] is None


def test_training_a_model_without_parameters_says_so():
    with pytest.raises(ConfigError, match="ReLU has no parameters.*mode='inference'"):
        CpuDevice().workload(torch.nn.ReLU(), torch.rand(1, 4), mode="train")


@pytest.mark.parametrize("options, message", [
    ({"min_batch": 0}, r"min_batch=0: give an integer >= 1"),
    ({"max_new_tokens": "4"}, None),
    ({"loss_fn": "mse"}, r"loss_fn='mse' is not callable"),
    ({"autocast": 16}, r"autocast=16: give True"),
    ({"make_batch": 3}, r"make_batch=3 is not callable"),
    ({"dataset": 5}, r"dataset=int: give a map-style dataset"),
])
def test_mode_options_are_checked_naming_the_value_and_what_is_accepted(options, message):
    mode = "generate" if "max_new_tokens" in options else "train"
    if message is None:   # generate needs a generate() method, which is checked first
        message = "mode='generate' needs a model with generate"
    example = None if {"make_batch", "dataset"} & set(options) else torch.rand(1, 4)
    with pytest.raises(ConfigError, match=message):
        CpuDevice().workload(torch.nn.Linear(4, 2), example, mode=mode, **options)


@pytest.mark.parametrize("arguments, message", [
    ({"cap": "8"}, r"optimal_batch\(cap='8' \(str\)\): cap must be an integer >= 1"),
    ({"cap": 0}, r"cap=0 \(int\)"),
    ({"max_latency_s": "abc"}, r"optimal_batch\(max_latency_s='abc' \(str\)\): .* number of seconds > 0"),
    ({"max_latency_s": -1.0}, r"max_latency_s=-1.0"),
    ({"name": 42}, r"optimal_batch\(name=42 \(int\)\): name must be a non-empty string"),
    ({"mode": "serve"}, r"mode='serve' \(str\)\): unknown mode; use one of inference, train, generate"),
])
def test_call_arguments_are_checked_up_front(arguments, message):
    call_arguments = {"name": None, "cap": None, "max_latency_s": None, "mode": "inference", **arguments}
    with pytest.raises(ConfigError, match=message):
        check_call(**call_arguments)


def test_marker_targets_are_checked_naming_the_range():
    check_marker({"min_speedup": 2, "max_latency_s": 0.5, "max_memory_bytes": 1 << 30})
    with pytest.raises(ConfigError, match=r"marker max_latency_s='10ms' \(str\): max_latency_s must be a "
                                          r"number of seconds > 0.*limits the search"):
        check_marker({"max_latency_s": "10ms"})
    with pytest.raises(ConfigError, match=r"max_memory_bytes=1.5"):
        check_marker({"max_memory_bytes": 1.5})
