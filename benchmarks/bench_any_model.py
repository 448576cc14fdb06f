"""The full search (maximum, optimal batch, gate samples) on the input kinds of issue 10, at CPU
sizes under small budgets: tiny configs with random weights, as tests/test_any_model.py uses them.

Prints a Markdown table: model | input kind | mode | optimal/max | probes/OOMs | search time, and
whether the maximum matches an independent measurement (the step written out by hand, its peak
counted by a fresh LiveMemory tracker on the CPU, or torch.cuda peak statistics on a GPU): the
maximum fits the budget and one sample more does not.

    PYTHONPATH=. python benchmarks/bench_any_model.py [--device cpu|cuda] [--scale N] [NAME ...]

``--scale`` multiplies every budget (a GPU has room for more; the CPU default is 1).
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from typing import Any, Callable

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from pytest_autobatch import Samples  # noqa: E402
from pytest_autobatch.devices import get_device  # noqa: E402
from pytest_autobatch.devices.torch_memory import LiveMemory, state_tensors  # noqa: E402
from pytest_autobatch.devices.torch_timing import TimingBudget  # noqa: E402
from pytest_autobatch.record import record_entry  # noqa: E402

MIB = 1 << 20
TIMING = TimingBudget(warmup_s=0.0, warmup_iterations=1, block_s=0.02, min_blocks=3, max_blocks=5, max_time_s=0.3)
CAP = 256


def _call(model: Any, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _loss(output: Any) -> torch.Tensor:
    values = list(output.values()) if isinstance(output, dict) else [output]
    total = values[0].sum()
    for value in values[1:]:
        total = total + value.sum()
    return total


def rows(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    return tensor.expand(batch, *tensor.shape[1:]).clone()


def independent_peak(case: dict[str, Any], batch: int, device: torch.device) -> int:
    """Peak bytes of one step at ``batch``, written out by hand."""
    model, mode = case["model"], case["mode"]
    build: Callable[[int], Any] = case["build"]
    optimizer = None
    if mode == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        optimizer.zero_grad(set_to_none=True)
        _loss(_call(model, build(case.get("min_batch", 1)))).backward()
        optimizer.step()
    else:
        model.eval()

    def step() -> None:
        inputs = build(batch)
        if mode == "train":
            assert optimizer is not None
            optimizer.zero_grad(set_to_none=True)
            _loss(_call(model, inputs)).backward()
            optimizer.step()
            return
        with torch.inference_mode():
            if mode == "generate":
                model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
            else:
                _call(model, inputs)

    try:
        if device.type == "cuda":
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        tracker = LiveMemory()
        tracker.track(state_tensors(model, optimizer))
        with tracker:
            step()
        return tracker.peak_bytes
    finally:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        gc.collect()


def cases(device: torch.device, scale: float) -> dict[str, Callable[[], dict[str, Any]]]:
    import transformers
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    def on(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, dict):
            return {key: on(item) for key, item in value.items()}
        return value

    def bert(positions: int = 64) -> Any:
        config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=positions)
        return transformers.BertModel(config).to(device)

    def bert_dict() -> dict[str, Any]:
        ids = torch.randint(1, 100, (1, 32), device=device)
        example = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
        return dict(model=bert(), kind="dict of tensors", mode="inference", example=example, options={},
                    budget=1 * MIB, build=lambda b: {key: rows(value, b) for key, value in example.items()})

    def detector() -> Any:   # as tests/test_any_model.py: 64x64 images, few proposals, a small box head
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        model = fasterrcnn_mobilenet_v3_large_320_fpn(
            weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64,
            rpn_pre_nms_top_n_test=64, rpn_post_nms_top_n_test=32, rpn_pre_nms_top_n_train=64,
            rpn_post_nms_top_n_train=32, box_batch_size_per_image=32)
        model.roi_heads.box_head = TwoMLPHead(256 * 7 * 7, 64)
        model.roi_heads.box_predictor = FastRCNNPredictor(64, 3)
        return model.to(device)

    image = torch.rand(3, 64, 64, device=device)
    target = on({"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])})

    def detection_eval() -> dict[str, Any]:
        return dict(model=detector(), kind="Samples (list of images)", mode="inference", example=Samples([image]),
                    options={}, budget=64 * MIB, build=lambda b: [image.clone() for _ in range(b)])

    def detection_train() -> dict[str, Any]:
        def build(b: int) -> Any:
            return ([image.clone() for _ in range(b)],
                    [{key: value.clone() for key, value in target.items()} for _ in range(b)])
        return dict(model=detector(), kind="Samples + target dicts", mode="train",
                    example=(Samples([image]), Samples([target])), options={}, budget=112 * MIB, build=build)

    def lstm() -> dict[str, Any]:
        x = torch.randn(20, 1, 32, device=device)
        return dict(model=torch.nn.LSTM(32, 64).to(device), kind="batch on dim 1", mode="inference", example=x,
                    options={"batch_dim": 1}, budget=MIB // 2, build=lambda b: x.expand(20, b, 32).clone())

    def factory() -> dict[str, Any]:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
                                    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))

        def make_batch(b: int) -> torch.Tensor:
            return torch.rand(b, 3, 32, 32, device=device)
        return dict(model=model.to(device), kind="make_batch(b)", mode="inference", example=None,
                    options={"make_batch": make_batch}, budget=2 * MIB, build=make_batch)

    def dataset() -> dict[str, Any]:
        generator = torch.Generator().manual_seed(0)
        samples = [torch.randint(1, 100, (length,), generator=generator) for length in [8] * 200 + [64] * 200]

        def pad(batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
            ids = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True)
            return on({"input_ids": ids, "attention_mask": (ids != 0).long()})
        order = sorted(range(len(samples)), key=lambda index: -len(samples[index]))
        return dict(model=bert(128), kind="dataset + collate, largest first", mode="inference", example=None,
                    options={"dataset": samples, "collate_fn": pad, "largest": len}, budget=2 * MIB,
                    build=lambda b: pad([samples[index] for index in order[:b]]))

    def t5() -> dict[str, Any]:
        config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                       num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        ids = torch.randint(2, 64, (1, 16), device=device)
        example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return dict(model=transformers.T5ForConditionalGeneration(config).to(device), kind="dict, encoder-decoder",
                    mode="generate", example=example, options={"max_new_tokens": 4}, budget=1 * MIB,
                    build=lambda b: {key: rows(value, b) for key, value in example.items()})

    def batchnorm() -> dict[str, Any]:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2),
                                    torch.nn.BatchNorm1d(2))
        x = torch.rand(2, 3, 32, 32, device=device)
        return dict(model=model.to(device), kind="tensor, BatchNorm (min batch 2)", mode="train", example=x,
                    options={}, budget=4 * MIB, build=lambda b: rows(x[:1], b), min_batch=2)

    built = {"bert-dict": bert_dict, "fasterrcnn-eval": detection_eval, "fasterrcnn-train": detection_train,
             "lstm-dim1": lstm, "cnn-make-batch": factory, "bert-dataset": dataset, "t5-generate": t5,
             "bn-train": batchnorm}

    def scaled(make: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        def build() -> dict[str, Any]:
            case = make()
            case["budget"] = int(case["budget"] * scale)
            return case
        return build
    return {name: scaled(make) for name, make in built.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("names", nargs="*")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(1)
    torch_device = torch.device(args.device)
    table = cases(torch_device, args.scale)
    print("| model | input kind | mode | budget | optimal/max | probes/OOMs | search time | independent check |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.names or list(table):
        case = table[name]()
        device = get_device(args.device, memory_budget=case["budget"])
        workload = device.workload(case["model"], case["example"], mode=case["mode"], timing=TIMING,
                                   **case["options"])
        began = time.perf_counter()
        try:
            entry = record_entry(device, workload, model=name, cap=CAP, steady_pause_s=0.0)
        finally:
            workload.close()
        seconds = time.perf_counter() - began
        maximum = entry["max_batch"]
        fits = independent_peak(case, maximum, torch_device) <= case["budget"]
        over = maximum == CAP or independent_peak(case, maximum + 1, torch_device) > case["budget"]
        check = "max fits, max+1 over" if fits and over else f"MISMATCH (fits={fits}, max+1 over={over})"
        search = entry["search"]
        print(f"| {name} | {case['kind']} | {case['mode']} | {case['budget'] / MIB:g} MiB | "
              f"{entry['optimal_batch']}/{maximum} | {search['probes']}/{search['ooms']} | {seconds:.1f} s | "
              f"{check} |", flush=True)
        del case, workload
        gc.collect()
        if torch_device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
