"""formats/onnx"""
