"""Writers of ONNX models: physical slimming and safe file output."""
