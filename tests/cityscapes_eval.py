"""The official Cityscapes pixel-level evaluator (``cityscapesscripts``), run on predicted label-id PNGs."""
import glob
import os

from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official


def official_miou(prediction_dir, dataset_root, split='val'):
    """Class IoU average of the official evaluator.

    ``prediction_dir`` holds one PNG of label ids per image, named after it, as
    ``tools/predict.py --save_format cityscapes`` writes them.
    """
    ground_truth = sorted(glob.glob(os.path.join(dataset_root, 'gtFine', split, '*', '*_gtFine_labelIds.png')))
    if not ground_truth:
        raise FileNotFoundError(f"no *_gtFine_labelIds.png under {dataset_root}/gtFine/{split}")
    args = official.args
    args.predictionPath = os.path.abspath(prediction_dir)
    args.predictionWalk = None
    args.evalInstLevelScore = False
    args.JSONOutput = False
    args.quiet = True
    predictions = [official.getPrediction(args, path) for path in ground_truth]
    result = official.evaluateImgLists(predictions, ground_truth, args)
    return result['averageScoreClasses']
