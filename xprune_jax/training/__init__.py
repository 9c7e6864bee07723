"""Recovery after pruning: fine-tuning with distillation (:mod:`.loop`, :mod:`.objectives`), training data
(:mod:`.data`), BatchNorm recalibration (:mod:`.recalibrate`) and the teacher's provenance (:mod:`.teacher`)."""
