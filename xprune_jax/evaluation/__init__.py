"""COCO evaluation of any detector through its DetectionPipeline."""
