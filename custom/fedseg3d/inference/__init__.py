"""Using a trained model on a patient's scan: loading the model a site deploys, prediction, export, calibration."""
