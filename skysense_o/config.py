"""Configuration keys of SkySense-O, added to a Detectron2 config by ``add_skysense_o_config``."""

from detectron2.config import CfgNode as CN


def add_skysense_o_config(cfg: CN) -> None:
    """Add every key that SkySense-O reads to ``cfg``, with its default value.

    Keys live under ``cfg.MODEL.SKYSENSE_O`` (the model), ``cfg.DATASETS`` and ``cfg.INPUT``
    (the data), ``cfg.SOLVER`` (optimisation) and ``cfg.TEST`` (inference), grouped by concern.
    """
    cfg.MODEL.META_ARCHITECTURE = "SkySenseO"
    # Images arrive as RGB in 0..255, and these are CLIP's normalisation constants in those
    # units. The SkySense-CLIP release normalises with the ImageNet values (123.675, 116.28,
    # 103.53) and (58.395, 57.12, 57.375) instead, which its configs set.
    cfg.MODEL.PIXEL_MEAN = [122.7709383, 116.7460125, 104.09373615]
    cfg.MODEL.PIXEL_STD = [68.5005327, 66.6321579, 70.32316305]

    cfg.MODEL.SKYSENSE_O = CN()
    node = cfg.MODEL.SKYSENSE_O
    # Require MODEL.WEIGHTS to match the model exactly (names and shapes). False loads what
    # matches and logs the rest at WARNING; use it only for a deliberate partial load.
    node.WEIGHTS_STRICT = True
    # Inference only (train_net.py --eval-only and tools/classify.py): build the model on the
    # meta device and memory-map MODEL.WEIGHTS, so that peak RAM stays near one copy of the
    # parameters instead of two. Needs a strict load (every parameter in the file). Backbones
    # that cannot be built on the meta device (open_clip's) are loaded by copy instead.
    node.LOW_MEMORY_LOAD = False

    # ---- Vision-language backbone --------------------------------------------------------
    node.BACKBONE = CN()
    # Registered name in VL_BACKBONE_REGISTRY: "OpenCLIPBackbone" (any open_clip model) or
    # "SkySenseCLIPBackbone" (the Swin-V2 tower of the SkySense-O release).
    node.BACKBONE.NAME = "OpenCLIPBackbone"
    # open_clip architecture name, for example "ViT-B-16", "ViT-L-14" or this project's
    # "SkySense-Tiny" (see skysense_o/model_configs/). For SkySenseCLIPBackbone, one of the
    # Swin-V2 variants "tiny", "small", "base", "large", "huge" (the release) or "giant", or
    # "custom" for the image tower given under SKYSENSE_CLIP.
    node.BACKBONE.ARCH = "SkySense-Tiny"
    # open_clip pretrained tag (for example "openai" or "laion2b_s34b_b88k"). Empty: no
    # download. A tag makes open_clip fetch the weights, so it needs network access once.
    node.BACKBONE.PRETRAINED = ""
    # Local weights file: an open_clip checkpoint, a RemoteCLIP/GeoRSCLIP-style state dict, or
    # the SkySense-CLIP pre-training file. Empty with no PRETRAINED tag: random initialisation,
    # reported with a WARNING.
    node.BACKBONE.CHECKPOINT = ""
    # Side of the square image (pixels) given to the backbone in "whole" inference and in
    # training. 384 in the release.
    node.BACKBONE.IMAGE_SIZE = 384
    # Indices of the transformer layers (0-based) whose tokens give the two guidance maps of a
    # ViT backbone, coarse to fine. Ignored by hierarchical backbones, which use their early
    # stages.
    node.BACKBONE.GUIDANCE_LAYERS = [3, 7]
    # Fine-tuning of each tower: "frozen" (no gradient), "attention" (attention and position
    # parameters only) or "full".
    node.BACKBONE.VISUAL_FINETUNE = "attention"
    node.BACKBONE.TEXT_FINETUNE = "attention"
    # Learning-rate multiplier for every backbone parameter (0.01 in the release).
    node.BACKBONE.LR_MULTIPLIER = 0.01
    # Gradient checkpointing in the image tower: trades compute for activation memory.
    node.BACKBONE.GRAD_CHECKPOINTING = False
    # SkySenseCLIPBackbone only; the defaults describe the release's model.
    node.BACKBONE.SKYSENSE_CLIP = CN()
    # Image tower used when ARCH is "custom" (ignored for named variants): patch-embedding
    # width, blocks and attention heads per stage, and an extra LayerNorm after every n-th
    # block of a stage (0: none).
    node.BACKBONE.SKYSENSE_CLIP.EMBED_DIMS = 352
    node.BACKBONE.SKYSENSE_CLIP.DEPTHS = [2, 2, 18, 2]
    node.BACKBONE.SKYSENSE_CLIP.NUM_HEADS = [8, 16, 32, 64]
    node.BACKBONE.SKYSENSE_CLIP.EXTRA_NORM_EVERY_N_BLOCKS = 6
    # Attention window of each image stage (tokens per side), and the window each stage was
    # pre-trained with, which scales the continuous position bias (0: the stage's own window).
    node.BACKBONE.SKYSENSE_CLIP.WINDOW_SIZES = [8, 8, 8, 16]
    node.BACKBONE.SKYSENSE_CLIP.PRETRAINED_WINDOW_SIZES = [0, 0, 0, 8]
    # Stochastic depth in training: drop probability of the last image block, rising linearly
    # from 0 at the first block. 0..1.
    node.BACKBONE.SKYSENSE_CLIP.DROP_PATH_RATE = 0.2
    # Width E of the joint embedding space.
    node.BACKBONE.SKYSENSE_CLIP.EMBED_DIM = 1024
    # Text transformer: width, layers, heads, tokens per prompt and vocabulary size (the last
    # two are fixed by CLIP's BPE tokenizer).
    node.BACKBONE.SKYSENSE_CLIP.TEXT_WIDTH = 1024
    node.BACKBONE.SKYSENSE_CLIP.TEXT_LAYERS = 24
    node.BACKBONE.SKYSENSE_CLIP.TEXT_HEADS = 16
    node.BACKBONE.SKYSENSE_CLIP.CONTEXT_LENGTH = 77
    node.BACKBONE.SKYSENSE_CLIP.VOCAB_SIZE = 49408

    # ---- Text prompts and the text-embedding cache ---------------------------------------
    node.TEXT = CN()
    # Prompt templates; "{}" is replaced by the class name. With several templates the
    # embeddings of one class are averaged ("ensemble") or kept apart as prompt channels
    # ("channels"), see ENSEMBLE.
    node.TEXT.TEMPLATES = ["A remote sensing image of a {}."]
    # "mean": average the normalised embeddings of the templates per class (one prompt channel);
    # "channels": one cost-volume channel per template (the decoder receives P = len(TEMPLATES) channels).
    node.TEXT.ENSEMBLE = "mean"
    # Number of prompts encoded per text-tower forward at inference; bounds the memory used to
    # encode a large vocabulary (the Sky-SA graph has 1,763 names).
    node.TEXT.CHUNK_SIZE = 128
    # Number of distinct vocabularies whose embeddings are kept in the inference cache.
    node.TEXT.CACHE_ENTRIES = 8

    # ---- Decoder ---------------------------------------------------------------------------
    node.DECODER = CN()
    # Registered name in DECODER_REGISTRY: "CostAggregationDecoder" (the release's design) or
    # "SAMMaskDecoder" (two-way transformer with class tokens as prompts).
    node.DECODER.NAME = "CostAggregationDecoder"
    # Channels of the 1x1 convs that reduce the two guidance maps before the decoder
    # (256 and 128 in the release), coarse to fine.
    node.DECODER.GUIDANCE_CHANNELS = [256, 128]
    # Hidden width of the decoder (128 in the release).
    node.DECODER.HIDDEN_DIM = 128
    # Width of the projected text guidance and appearance guidance (128 in the release).
    node.DECODER.TEXT_GUIDANCE_DIM = 128
    node.DECODER.APPEARANCE_GUIDANCE_DIM = 128
    # Output channels of the two upsampling blocks, coarse to fine ([64, 32] in the release).
    node.DECODER.UPSAMPLE_DIMS = [64, 32]
    # Channels the two guidance maps are projected to inside the upsampling blocks.
    node.DECODER.UPSAMPLE_GUIDANCE_DIMS = [32, 16]
    # Aggregation layers (each: spatial Swin blocks, then class attention) and their heads.
    node.DECODER.NUM_LAYERS = 2
    node.DECODER.NUM_HEADS = 4
    # Window of the spatial Swin blocks, in embedding cells (12 in the release).
    node.DECODER.WINDOW_SIZE = 12
    # Average-pooling kernel before class attention (2x2 in the release).
    node.DECODER.POOLING_SIZE = [2, 2]
    # Class budget: above this many classes only the top ones by best raw similarity are
    # decoded and the rest get logit -100. With PAD_CLASSES, fewer classes are padded to it
    # with learned tokens (the release pads to 256).
    node.DECODER.CLASS_BUDGET = 256
    node.DECODER.PAD_CLASSES = True
    # Cost-aggregation decoder: number of classes that go through the per-class stages
    # (spatial Swin blocks and upsampling blocks) together. It bounds peak memory for large
    # vocabularies and does not change the output; 0 runs all classes at once.
    node.DECODER.CLASS_CHUNK = 32
    # SAM-style decoder: depth, heads and MLP width of its two-way transformer.
    node.DECODER.SAM_DEPTH = 2
    node.DECODER.SAM_NUM_HEADS = 8
    node.DECODER.SAM_MLP_DIM = 1024
    # SAM-style decoder: number of class tokens that go through the two-way transformer
    # together. Tokens are processed in chunks of this size, so memory grows linearly with the
    # vocabulary.
    node.DECODER.SAM_CLASS_CHUNK = 64

    # ---- Losses ----------------------------------------------------------------------------
    node.LOSS = CN()
    # Weight of the per-pixel binary cross-entropy over classes (ignored pixels excluded).
    node.LOSS.PIXEL_WEIGHT = 1.0
    # Weight of the region-text contrast between mask-pooled image features and class texts.
    node.LOSS.REGION_CONTRAST_WEIGHT = 0.0
    # Weight of the vision-centric regulariser (graph- and name-similarity-weighted).
    node.LOSS.REGULAR_WEIGHT = 0.0
    # Multiplier applied to the min-max normalised region-text similarities before they are used
    # as logits (1.0 reproduces the release's formula).
    node.LOSS.CONTRAST_SCALE = 1.0
    # Source of the class-name similarity of the regulariser: "text_tower" (this model's own
    # text tower, no extra download) or a path or name of a sentence-transformers model.
    node.LOSS.NAME_SIMILARITY = "text_tower"
    # Label value that the losses skip.
    node.LOSS.IGNORE_VALUE = 255
    # Count ignored pixels as negatives of every class in the pixel loss, as the release does.
    # False (the default) leaves them out.
    node.LOSS.IGNORE_AS_NEGATIVE = False
    # How region features are computed for the two auxiliary losses: "embedding" pools the
    # dense embedding at its own resolution with area-resized masks; "pixel_shuffle" is the
    # release's path (a 1x1 conv to E x UPSCALE^2 channels, a pixel shuffle and a 1x1 conv;
    # 268M parameters at E = 1024), kept for exact reproduction.
    node.LOSS.REGION_POOLING = "embedding"
    # Upscale factor of the "pixel_shuffle" region path (16 in the release).
    node.LOSS.PIXEL_SHUFFLE_UPSCALE = 16

    # ---- Inference --------------------------------------------------------------------------
    node.INFERENCE = CN()
    # "whole": resize the padded image to IMAGE_SIZE x IMAGE_SIZE (the release's protocol);
    # "sliding": windows of WINDOW pixels at STRIDE, averaged where they overlap.
    node.INFERENCE.MODE = "whole"
    # Keep the aspect ratio in "whole" mode (resize the long side to IMAGE_SIZE and pad),
    # instead of squashing the image to a square as the release does.
    node.INFERENCE.KEEP_ASPECT_RATIO = False
    node.INFERENCE.WINDOW = 384
    node.INFERENCE.STRIDE = 256
    # Sliding mode: also predict a resized view of the whole image and average it in with
    # this weight (0 disables the global view).
    node.INFERENCE.GLOBAL_WEIGHT = 0.0
    # Upper bound on the images per backbone forward in sliding mode.
    node.INFERENCE.WINDOW_BATCH = 4
    # How overlapping windows are averaged: "uniform" (every window counts the same) or
    # "tent" (each window's weight falls linearly from its centre towards its edges, which
    # removes the straight seams where the set of overlapping windows changes).
    node.INFERENCE.WINDOW_BLEND = "uniform"
    # Autocast dtype at inference: "" (float32), "bfloat16" or "float16". Training uses
    # SOLVER.AMP instead.
    node.INFERENCE.AMP_DTYPE = ""
    # What the model returns per image as "sem_seg": "probabilities" (T x H x W, the
    # Detectron2 convention) or "labels" (H x W int64 indices of the top class). Evaluation
    # needs only the labels. With thousands of names they cost a fraction of the time and
    # memory, because the T x H x W volume is never built.
    node.INFERENCE.OUTPUT = "probabilities"
    # Retrieval augmentation: when a class has synonyms (from the dataset's metadata or the
    # input), its score is the maximum over the class and its synonyms.
    node.INFERENCE.RETRIEVAL_AUGMENTATION = False

    # ---- Data ------------------------------------------------------------------------------
    # Name of the dataset mapper in MAPPER_REGISTRY used for training.
    cfg.INPUT.DATASET_MAPPER_NAME = "skysa_semantic"
    # SSD-style photometric distortion during training.
    cfg.INPUT.COLOR_AUG_SSD = True
    # Pad images to a multiple of this many pixels (32 in the release).
    cfg.INPUT.SIZE_DIVISIBILITY = 32
    # Value (0..255, all channels) of the image pixels added by padding in training; 128 in the
    # release. Padded label pixels are ignored.
    cfg.INPUT.IMAGE_PAD_VALUE = 128
    # Training crop: the largest share (0..1] of the crop's labelled pixels that one class may
    # cover; up to 10 crops are tried to meet it. 1.0 turns the constraint off.
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    # Refuse images with more pixels than this (a guard against decompression bombs).
    # Images above it can still be segmented with the demo's sliding window after raising it.
    cfg.INPUT.MAX_IMAGE_PIXELS = 178_956_970
    # Bands of a multi-band image used as R, G, B (0-based).
    cfg.INPUT.BANDS = [0, 1, 2]

    cfg.DATASETS.SKYSA = CN()
    # Names sampled per image in training: the image's classes, then negatives up to this.
    cfg.DATASETS.SKYSA.TEXT_BATCH = 100
    # Graph score bounds [neg_low, neg_high, pos_low, pos_high] (integers 1..10) that make a
    # neighbour a negative or a positive in dynamic text sampling.
    cfg.DATASETS.SKYSA.SAMPLING_HYPER = [1, 3, 9, 10]
    # The visual-relevance graph (a skysa_graph.jsonl file). Empty: the Sky-SA default
    # <DETECTRON2_DATASETS>/Sky-SA/skysa_graph.jsonl for Sky-SA datasets, none otherwise.
    cfg.DATASETS.SKYSA.GRAPH_FILE = ""
    # Fraction (0..1) of the training samples read that may fail to load (skipped and logged
    # with their file names) before the run stops. Checked once 20 samples, or all of a
    # smaller dataset, have been read, and counted per data-loader worker process.
    cfg.DATASETS.SKYSA.MAX_BAD_SAMPLE_FRACTION = 0.05

    # ---- Evaluation outputs --------------------------------------------------------------------
    cfg.TEST.SKYSENSE_O = CN()
    # Write a colour map and an overlay with a legend for every evaluated image.
    cfg.TEST.SKYSENSE_O.VISUALIZE = False
    # Also write each predicted label map as a PNG.
    cfg.TEST.SKYSENSE_O.SAVE_PREDICTIONS = False
    # Also evaluate the majority-class baseline: predict, everywhere, the class with the most
    # labelled pixels in DATASETS.TRAIN among each evaluation dataset's classes.
    cfg.TEST.SKYSENSE_O.MAJORITY_BASELINE = False

    # ---- Optimisation ------------------------------------------------------------------------
    # "ADAMW" (the release) or "SGD" (with SOLVER.MOMENTUM).
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # Weight decay of normalisation layers, biases and embeddings (0 in the release).
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # Clip the gradient norm of all parameters together ("full_model", as the release does at
    # 0.01); Detectron2's per-parameter "value" and "norm" clipping are accepted too.
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.01
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
    # Stochastic weight averaging: train_net.py averages the weights from the iteration at
    # START_FRACTION (0..1) of SOLVER.MAX_ITER on, every PERIOD iterations and after the last
    # one. It loads that uniform average into the model before it writes model_final.pth and
    # evaluates. A fraction, not an iteration, so that a shorter SOLVER.MAX_ITER still works.
    cfg.SOLVER.WEIGHT_AVERAGE = CN()
    cfg.SOLVER.WEIGHT_AVERAGE.ENABLED = False
    cfg.SOLVER.WEIGHT_AVERAGE.START_FRACTION = 0.5
    cfg.SOLVER.WEIGHT_AVERAGE.PERIOD = 10
