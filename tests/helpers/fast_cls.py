"""Test plugin: the cls classifier trained briefly (what a test of the loop around the
evaluation needs is the evaluation's place in the loop, not the classifier's accuracy)."""

from gan_dist.eval import classifier

classifier.EPOCHS = 1
classifier.MIN_STEPS = 20
