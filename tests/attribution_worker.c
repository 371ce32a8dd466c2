/* Test programs for tests/test_attribution.py, built static with `cc` as Go
 * builds its binaries.
 *
 * worker WATCHED_FILE PORT PROG: the way a Go program acts. The main thread
 * sleeps (so that the worker is born well after the process), starts one
 * worker thread and leaves (SYS_exit of the leader alone). The worker
 * connects to 127.0.0.1:PORT, writes WATCHED_FILE, forks a child that execs
 * PROG, and spawns PROG again with posix_spawn (clone(CLONE_VM|CLONE_VFORK),
 * which is what Go's os/exec does), prints "PID TID" and, as the last thread
 * of the process, exits it with status 3.
 *
 * idle N: forks N children that wait for a signal, prints "ready", waits. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;
static char **args;

static void *worker(void *unused)
{
    (void)unused;
    usleep(100000);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(atoi(args[3]))};
    inet_pton(AF_INET, "127.0.0.1", &to.sin_addr);
    if (s < 0 || connect(s, (struct sockaddr *)&to, sizeof(to)) < 0)
        _exit(10);
    close(s);
    int f = open(args[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (f < 0 || write(f, "x\n", 2) != 2)
        _exit(11);
    close(f);
    int status;
    pid_t child = fork();
    if (child == 0) {
        execl(args[4], args[4], "forked", (char *)0);
        _exit(12);
    }
    if (child < 0 || waitpid(child, &status, 0) < 0)
        _exit(13);
    char *argv[] = {args[4], "spawned", 0};
    pid_t spawned;
    if (posix_spawn(&spawned, args[4], 0, 0, argv, environ) != 0 || waitpid(spawned, &status, 0) < 0)
        _exit(14);
    printf("%d %ld\n", getpid(), (long)syscall(SYS_gettid));
    fflush(stdout);
    usleep(300000);
    exit(3);                    /* exit_group, from the last thread left */
}

static int idle(int n)
{
    for (int i = 0; i < n; i++) {
        pid_t child = fork();
        if (child < 0)
            return 20;
        if (child == 0) {
            pause();
            _exit(0);
        }
    }
    printf("ready\n");
    fflush(stdout);
    pause();
    return 0;
}

int main(int argc, char **argv)
{
    args = argv;
    if (argc == 3 && strcmp(argv[1], "idle") == 0)
        return idle(atoi(argv[2]));
    if (argc != 5 || strcmp(argv[1], "worker") != 0) {
        fprintf(stderr, "usage: worker FILE PORT PROG | idle N\n");
        return 2;
    }
    usleep(300000);
    pthread_t t;
    if (pthread_create(&t, 0, worker, 0) != 0)
        return 15;
    syscall(SYS_exit, 0);       /* the leader thread alone */
    return 0;
}
