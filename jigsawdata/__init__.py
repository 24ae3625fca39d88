"""jigsawdata: cheap object-detection pre-training from the detection set itself.

The library turns a COCO-format detection set into aspect-ratio-grouped WebDataset shards of
object and background crops (``build``), which ``pipelines`` stitch into 2S+1T+1W jigsaw
images for ERF-adaptive dense classification pre-training (``trainer``).
"""

__version__ = "0.1.0"
