//! GGUF import (reader, dequantisation, conversion to a Hugging Face model directory).
