"""Tokenizers (SentencePiece, tiktoken, Hugging Face tokenizers, GGUF vocabularies) behind one
interface, incremental decoding, and chat formats. Depends on nothing in herd but errors."""

from herd.tokenizer.base import Tokenizer
from herd.tokenizer.chat import ChatFormat, JinjaChat, Llama2Chat, Llama3Chat, Llama4Chat, chat_format_for
from herd.tokenizer.from_gguf import tokenizer_from_gguf
from herd.tokenizer.hf import HFTokenizer
from herd.tokenizer.load import load_tokenizer
from herd.tokenizer.spm import SentencePieceTokenizer
from herd.tokenizer.stream import StreamDecoder
from herd.tokenizer.tiktoken_bpe import TiktokenTokenizer
from herd.tokenizer.tools import ChatReply, ToolCall, parse_tool_calls

__all__ = [
    "ChatFormat",
    "ChatReply",
    "HFTokenizer",
    "JinjaChat",
    "Llama2Chat",
    "Llama3Chat",
    "Llama4Chat",
    "SentencePieceTokenizer",
    "StreamDecoder",
    "TiktokenTokenizer",
    "ToolCall",
    "Tokenizer",
    "chat_format_for",
    "load_tokenizer",
    "parse_tool_calls",
    "tokenizer_from_gguf",
]
