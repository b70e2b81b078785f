"""Data shared by every stage: the record type, loaders, the paper's prompts and answer grading."""
from data.grading import extract_answer, grade, grade_many
from data.loaders import DATA_FORMATS, SOURCES, add_data_arguments, load_records, write_records
from data.prompts import assistant_target, prompt_text, user_messages
from data.records import DataError, Record, run_script

__all__ = ["DATA_FORMATS", "SOURCES", "DataError", "Record", "add_data_arguments", "assistant_target", "extract_answer", "grade",
           "grade_many", "load_records", "prompt_text", "run_script", "user_messages", "write_records"]
