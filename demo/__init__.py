"""Real torchtitan-layout DCP checkpoints, for the demo step and for the tests."""
