"""The offline side: a corpus from the play texts (`corpus`, `playtexts`), training with exact resume
(`train`: `TrainConfig`, `run_training`), temperature calibration (`calibrate`) and evaluation
(`evaluate`). Everything here needs the full install (torch); the server imports none of it.
"""
