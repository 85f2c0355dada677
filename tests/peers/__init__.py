"""Real peers for the tests: torchtitan writes checkpoints, torchtune loads the output."""
