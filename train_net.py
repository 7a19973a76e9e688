#!/usr/bin/env python3
"""Train and evaluate SkySense-O with Detectron2.

Examples:
    python train_net.py --config-file configs/quickstart.yaml
    python train_net.py --config-file configs/quickstart.yaml --eval-only MODEL.WEIGHTS model.pth
    python train_net.py --config-file configs/skysense_o.yaml --num-gpus 8 --resume
"""

import copy
import itertools
import json
import logging
import os
from collections import OrderedDict
from typing import Any, Dict, List

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import (
    DatasetFromList,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import (
    DefaultTrainer,
    default_argument_parser,
    default_setup,
    hooks,
    launch,
)
from detectron2.evaluation import DatasetEvaluators, inference_on_dataset, print_csv_format
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from tabulate import tabulate

from skysense_o import add_skysense_o_config
from skysense_o.checkpoint import SkySenseOCheckpointer
from skysense_o.data.dataset_mappers import MAPPER_REGISTRY
from skysense_o.data.dataset_mappers.robust import SkipBadSamples
from skysense_o.engine import merge_overrides
from skysense_o.engine.auxiliary_coverage import AuxiliaryLossCoverage
from skysense_o.engine.weight_averaging import CHECKPOINT_KEY, WeightAveraging, start_iteration
from skysense_o.evaluation import build_evaluator
from skysense_o.evaluation.baseline import evaluate_majority_baseline
from skysense_o.evaluation.visualization_writer import VisualizationWriter
from skysense_o.modeling.meta_arch import check_config_choices
from skysense_o.release import build_model_for_inference

logger = logging.getLogger("skysense_o")

TEST_MAPPER_NAME = "skysense_test"
# Key of the optimizer's state (and the AMP grad scaler's) in the trainer's checkpoint entry.
INNER_TRAINER_STATE_KEY = "_trainer"
SUMMARY_METRICS = ("mIoU", "fwIoU", "mACC", "pACC")


def build_optimizer_for(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (or SGD) with the backbone at its own learning rate and no decay on norms,
    biases and embeddings, wrapped with the configured gradient clipping."""
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm2d,
                  torch.nn.modules.batchnorm._NormBase)
    multiplier = cfg.MODEL.SKYSENSE_O.BACKBONE.LR_MULTIPLIER
    groups: List[Dict[str, Any]] = []
    seen = set()
    for module_name, module in model.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            full_name = f"{module_name}.{name}" if module_name else name
            lr = cfg.SOLVER.BASE_LR
            if full_name.startswith("sem_seg_head.clip_model."):
                lr *= multiplier
            decay = cfg.SOLVER.WEIGHT_DECAY
            if isinstance(module, norm_types):
                decay = cfg.SOLVER.WEIGHT_DECAY_NORM
            elif isinstance(module, torch.nn.Embedding) or "embedding" in name or \
                    name in ("padding_tokens", "padding_guidance", "class_embedding"):
                decay = cfg.SOLVER.WEIGHT_DECAY_EMBED
            elif name.endswith("bias") or parameter.ndim <= 1:
                decay = cfg.SOLVER.WEIGHT_DECAY_NORM
            groups.append({"params": [parameter], "lr": lr, "weight_decay": decay})

    optimizer_name = cfg.SOLVER.OPTIMIZER.upper()
    if optimizer_name == "ADAMW":
        optimizer_class = torch.optim.AdamW
        kwargs = {"lr": cfg.SOLVER.BASE_LR}
    elif optimizer_name == "SGD":
        optimizer_class = torch.optim.SGD
        kwargs = {"lr": cfg.SOLVER.BASE_LR, "momentum": cfg.SOLVER.MOMENTUM}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r}; expected ADAMW or SGD")

    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optimizer_class = _with_full_model_clipping(optimizer_class, clip.CLIP_VALUE,
                                                    clip.NORM_TYPE)
        return optimizer_class(groups, **kwargs)
    return maybe_add_gradient_clipping(cfg, optimizer_class)(groups, **kwargs)


def _with_full_model_clipping(optimizer_class, max_norm: float, norm_type: float):
    """Return a subclass of ``optimizer_class`` that clips the norm of all gradients together
    before each step (Detectron2's built-in clipping works per parameter)."""

    class FullModelClippingOptimizer(optimizer_class):
        def step(self, closure=None):
            parameters = itertools.chain(*[group["params"] for group in self.param_groups])
            torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type=norm_type)
            return super().step(closure=closure)

    FullModelClippingOptimizer.__name__ = f"FullModelClipping{optimizer_class.__name__}"
    return FullModelClippingOptimizer


class Trainer(DefaultTrainer):
    """DefaultTrainer with SkySense-O's mappers, evaluator, optimizer and checkpointer."""

    def __init__(self, cfg: CfgNode):
        self.weight_averaging = None
        super().__init__(cfg)
        # Replace the default checkpointer with the safe, strict and atomic one, keeping the
        # object it saves besides the model (this trainer, see state_dict) and the hooks that
        # use it. The running weight average is saved with it, so --resume continues it.
        checkpointables = dict(self.checkpointer.checkpointables)
        if self.weight_averaging is not None:
            checkpointables[CHECKPOINT_KEY] = self.weight_averaging.averaged
        self.checkpointer = SkySenseOCheckpointer(
            self._trainer.model, cfg.OUTPUT_DIR, strict=cfg.MODEL.SKYSENSE_O.WEIGHTS_STRICT,
            **checkpointables,
        )
        for hook in self._hooks:
            if hasattr(hook, "checkpointer"):
                hook.checkpointer = self.checkpointer

    def build_hooks(self) -> List[hooks.HookBase]:
        """Return Detectron2's hooks plus the report of skipped auxiliary losses, and weight
        averaging (when enabled) before the checkpointer."""
        hook_list = super().build_hooks()
        if AuxiliaryLossCoverage.applies_to(self.model):
            # Its scalar must be in the storage before the periodic writer, the last hook, runs.
            hook_list.insert(0, AuxiliaryLossCoverage(self.model))
        average = self.cfg.SOLVER.WEIGHT_AVERAGE
        if not average.ENABLED:
            return hook_list
        max_iter = self.cfg.SOLVER.MAX_ITER
        self.weight_averaging = WeightAveraging(
            self.model, start_iter=start_iteration(average.START_FRACTION, max_iter),
            period=average.PERIOD, max_iter=max_iter,
        )
        # The average must be in the model when the checkpointer writes model_final.
        position = next((index for index, hook in enumerate(hook_list)
                         if isinstance(hook, hooks.PeriodicCheckpointer)), len(hook_list))
        hook_list.insert(position, self.weight_averaging)
        return hook_list

    def state_dict(self) -> Dict[str, Any]:
        """Return the iteration, the hooks' state (the LR scheduler) and the optimizer's state."""
        # Detectron2 0.6's DefaultTrainer saves the iteration and the LR scheduler but not the
        # optimizer. A resumed run would then restart AdamW's moment estimates, and it would run
        # its first iteration at the learning rate of iteration 0, because the restored
        # scheduler sets the rate only after that iteration.
        state = super().state_dict()
        state[INNER_TRAINER_STATE_KEY] = self._trainer.state_dict()
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if INNER_TRAINER_STATE_KEY in state_dict:
            self._trainer.load_state_dict(state_dict[INNER_TRAINER_STATE_KEY])
        else:
            logger.warning(
                "The checkpoint has no optimizer state, so the optimizer starts afresh at "
                "iteration %d.", self.iter + 1,
            )

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        """Build the training loader, whose mapper skips samples that fail to load.

        NOTE: after --resume the data order is the same only in Detectron2's sense. With SEED
        >= 0, default_setup seeds every generator with SEED + rank, so the TrainingSampler gets
        the same shuffle seed (comm.shared_random_seed) in every run with the same config and
        number of processes. Its stream of indices starts again from the beginning, though:
        Detectron2 0.6 does not skip the samples consumed before the checkpoint, so a resumed
        run repeats the original order from iteration 0. With SEED < 0 (Detectron2's default)
        every run draws a new seed. The bad-sample counts of SkipBadSamples restart from zero
        as well.
        """
        if not cfg.DATASETS.TRAIN:
            raise ValueError("DATASETS.TRAIN is empty; name at least one registered dataset.")
        # SkipBadSamples draws replacements from the same serialized dataset that the loader
        # samples from, so each process keeps one copy of it. An unregistered name raises
        # Detectron2's KeyError, which lists the registered datasets.
        dataset = DatasetFromList(
            get_detection_dataset_dicts(
                cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
            ),
            copy=False,
        )
        mapper = MAPPER_REGISTRY.get(cfg.INPUT.DATASET_MAPPER_NAME)(cfg, True)
        mapper = SkipBadSamples(cfg, mapper, dataset=dataset)
        return build_detection_train_loader(cfg, mapper=mapper, dataset=dataset)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        mapper = MAPPER_REGISTRY.get(TEST_MAPPER_NAME)(cfg, False, dataset_name=dataset_name)
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str = None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluators = [build_evaluator(
            dataset_name, output_folder, save_predictions=cfg.TEST.SKYSENSE_O.SAVE_PREDICTIONS,
        )]
        if cfg.TEST.SKYSENSE_O.VISUALIZE:
            evaluators.append(VisualizationWriter(dataset_name, output_folder))
        return DatasetEvaluators(evaluators)

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module):
        return build_optimizer_for(cfg, model)

    @classmethod
    def test(cls, cfg: CfgNode, model, evaluators=None):
        results = OrderedDict()
        for dataset_name in cfg.DATASETS.TEST:
            loader = cls.build_test_loader(cfg, dataset_name)
            evaluator = cls.build_evaluator(cfg, dataset_name)
            result = inference_on_dataset(model, loader, evaluator)
            results[dataset_name] = result
            if comm.is_main_process():
                logger.info("Evaluation results for %s in csv format:", dataset_name)
                print_csv_format(result)
        if comm.is_main_process() and results:
            report_results(cfg, results)
        return results


def report_results(cfg: CfgNode, results: Dict[str, Dict]) -> None:
    """Log one table across datasets (with the majority baseline when asked) and save it."""
    rows = []
    summary = OrderedDict()
    for dataset_name, result in results.items():
        metrics = result.get("sem_seg", {})
        summary[dataset_name] = {key: metrics.get(key) for key in SUMMARY_METRICS}
        rows.append([dataset_name, "SkySense-O"] + [metrics.get(key) for key in SUMMARY_METRICS])
        if cfg.TEST.SKYSENSE_O.MAJORITY_BASELINE:
            try:
                baseline = evaluate_majority_baseline(cfg.DATASETS.TRAIN, dataset_name)
            except (FileNotFoundError, KeyError, ValueError) as error:
                # The baseline needs the training labels; evaluating without them still
                # reports the model's own metrics.
                logger.warning("Majority-class baseline of %s skipped: %s", dataset_name, error)
                continue
            summary[dataset_name]["majority_baseline"] = baseline
            rows.append([dataset_name, f"majority class ({baseline['class']})"]
                        + [baseline["metrics"].get(key) for key in SUMMARY_METRICS])
    table = tabulate(rows, headers=["dataset", "predictor", *SUMMARY_METRICS], floatfmt=".2f",
                     tablefmt="pipe")
    logger.info("Results across datasets:\n%s", table)
    if cfg.OUTPUT_DIR:
        path = os.path.join(cfg.OUTPUT_DIR, "results_summary.json")
        with open(path, "w") as stream:
            json.dump(summary, stream, indent=2)
        logger.info("Wrote %s", path)


def setup(args) -> CfgNode:
    """Build the config from the defaults, the config file and the command-line overrides."""
    cfg = get_cfg()
    add_skysense_o_config(cfg)
    # KeyError's str() puts quotes around the message, so the messages are taken from args.
    if not os.path.isfile(args.config_file):
        raise SystemExit(
            f"Config file {args.config_file} not found: give a path such as "
            "configs/quickstart.yaml"
        )
    try:
        cfg.merge_from_file(args.config_file)
    except KeyError as error:
        raise SystemExit(f"Invalid config file {args.config_file}: {error.args[0]}") from None
    try:
        merge_overrides(cfg, args.opts)
    except (KeyError, ValueError) as error:
        raise SystemExit(f"Invalid command-line override: {error.args[0]}") from None
    cfg.freeze()
    try:
        check_config_choices(cfg)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="skysense_o")
    return cfg


def check_weights_file(cfg: CfgNode, args) -> None:
    """Stop with a one-line message when --eval-only is given a MODEL.WEIGHTS file that is
    missing, before the model is built. URLs and Detectron2's catalog names are left to the
    checkpointer."""
    weights = cfg.MODEL.WEIGHTS
    if not args.eval_only or args.resume or not weights or "://" in weights:
        return
    if not os.path.isfile(weights):
        raise SystemExit(
            f"MODEL.WEIGHTS {weights} not found: give the path of a checkpoint, such as "
            "output/quickstart/model_final.pth after the quick start"
        )


def main(args):
    cfg = setup(args)
    check_weights_file(cfg, args)
    if args.eval_only:
        if cfg.MODEL.SKYSENSE_O.LOW_MEMORY_LOAD and not args.resume:
            model = build_model_for_inference(cfg, cfg.MODEL.WEIGHTS)
            return Trainer.test(cfg, model)
        model = Trainer.build_model(cfg)
        SkySenseOCheckpointer(
            model, save_dir=cfg.OUTPUT_DIR, strict=cfg.MODEL.SKYSENSE_O.WEIGHTS_STRICT
        ).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
