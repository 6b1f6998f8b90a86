"""Export: deployable artifacts the runner still scores with every task.

``onnx.py`` (torch.onnx dynamo export of the decoder with its KV cache as inputs and
outputs), ``nbits.py`` (int4/int8 block-wise weights as onnxruntime ``MatMulNBits``, codes
carried over from the quantize stage), ``int8.py`` (int8 dynamic quantization), ``session.py``
(the onnxruntime KV-cache loop: prefill, decode, streaming eviction), ``ort.py`` (the
``Runtime`` behind ``load_runtime`` for the ``onnx`` format), ``parity.py`` (logits and greedy
tokens against PyTorch), ``bundle.py`` (the edge bundle), ``tensorrt.py`` (a TensorRT engine
from the graph). Nothing here is imported by ``import knowpress``.
"""
