"""Judging `qm guest exec` answers (pure): the exit status inside the VM is in the JSON."""

from __future__ import annotations

from reconciler.guests.agent import exec_hook_failure, parse_exec_answers

FAILED = '{\n   "err-data" : "boom\\n",\n   "exitcode" : 1,\n   "exited" : 1\n}\n'
OK = '{\n   "exitcode" : 0,\n   "exited" : 1,\n   "out-data" : "hi\\n"\n}\n'


def test_an_answer_with_a_non_zero_exitcode_is_a_failure_naming_its_stderr():
    assert exec_hook_failure("qm guest exec 201 -- false", FAILED) == "exitcode 1 inside the guest: boom"


def test_the_compact_form_the_issue_quotes_is_judged_the_same():
    assert (
        exec_hook_failure("qm guest exec 201 -- x", '{"exitcode":1,"exited":1,"err-data":"boom"}')
        == "exitcode 1 inside the guest: boom"
    )


def test_every_answer_of_a_hook_that_runs_several_counts():
    command = "qm guest exec 201 -- true && qm guest exec 202 -- false"
    assert exec_hook_failure(command, "reloading\n" + OK + FAILED).startswith("exitcode 1")
    assert exec_hook_failure(command, OK + OK) is None


def test_an_answer_with_only_a_pid_is_a_command_qm_stopped_waiting_for():
    text = 'timeout reached, returning pid\n{\n   "pid" : 4242\n}\n'
    assert "did not finish before qm's --timeout" in exec_hook_failure("qm guest exec 201 --timeout 1 -- x", text)


def test_a_command_killed_by_a_signal_inside_the_vm_failed():
    assert "signal 9" in exec_hook_failure("qm guest exec 201 -- x", '{"exited": 1, "signal": 9}')


def test_other_commands_and_output_without_answers_keep_their_exit_status():
    assert exec_hook_failure("systemctl reload nginx", FAILED) is None
    assert exec_hook_failure("qm guest exec 201 -- true > /dev/null", "") is None


def test_json_printed_by_the_command_itself_is_not_taken_for_an_answer():
    runs = parse_exec_answers('{"status": "fine"}\n' + OK)
    assert [r.exitcode for r in runs] == [0]
