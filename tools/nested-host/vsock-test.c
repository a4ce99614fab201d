/*
 * vsock-test: the guest side of ember's vsock tests (tests/linux_guest.rs), built static
 * into the guests' initramfs by build.sh. Busybox has no AF_VSOCK, hence this program.
 *
 *   vsock-test echo PORT        listen on PORT; echo every connection's bytes back until
 *                               its EOF, one process per connection (many at once)
 *   vsock-test stall PORT       listen on PORT; accept connections and never read them
 *   vsock-test send CID PORT N  connect to CID:PORT, send N pattern bytes, shut down the
 *                               write side, read the peer's answer to its EOF; prints
 *                               "sent=N got=M match=yes|no"
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static unsigned char pattern(unsigned long i) { return (unsigned char)((i * 7 + i / 251) & 0xff); }

static int listen_on(unsigned port) {
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 128) < 0) {
        perror("vsock-test: listen");
        exit(1);
    }
    return fd;
}

static int write_all(int fd, const unsigned char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static void echo(int conn) {
    unsigned char buf[65536];
    for (;;) {
        ssize_t n = read(conn, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        if (write_all(conn, buf, (size_t)n) < 0) break;
    }
    close(conn);
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "echo") == 0) {
        int fd = listen_on((unsigned)atoi(argv[2]));
        signal(SIGCHLD, SIG_IGN); /* no zombies from the echo children */
        for (;;) {
            int conn = accept(fd, NULL, NULL);
            if (conn < 0) continue;
            if (fork() == 0) {
                close(fd);
                echo(conn);
                _exit(0);
            }
            close(conn);
        }
    }
    if (argc == 3 && strcmp(argv[1], "stall") == 0) {
        int fd = listen_on((unsigned)atoi(argv[2]));
        for (;;) {
            if (accept(fd, NULL, NULL) < 0 && errno != EINTR) return 1;
        }
    }
    if (argc == 5 && strcmp(argv[1], "send") == 0) {
        unsigned long total = strtoul(argv[4], NULL, 10), got = 0, i;
        int fd = socket(AF_VSOCK, SOCK_STREAM, 0), match = 1;
        struct sockaddr_vm addr = {.svm_family = AF_VSOCK,
                                   .svm_cid = (unsigned)atoi(argv[2]),
                                   .svm_port = (unsigned)atoi(argv[3])};
        unsigned char buf[65536];
        if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
            printf("sent=0 got=0 match=no error=%s\n", strerror(errno));
            return 1;
        }
        /* A child writes while this process reads: an echo peer answers as it reads,
         * and neither side's buffers hold a whole stream. */
        pid_t writer = fork();
        if (writer == 0) {
            for (i = 0; i < total;) {
                size_t n = total - i < sizeof buf ? total - i : sizeof buf, k;
                for (k = 0; k < n; k++) buf[k] = pattern(i + k);
                if (write_all(fd, buf, n) < 0) _exit(1);
                i += n;
            }
            shutdown(fd, SHUT_WR);
            _exit(0);
        }
        for (;;) {
            ssize_t n = read(fd, buf, sizeof buf), k;
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) break;
            for (k = 0; k < n; k++)
                if (buf[k] != pattern(got + (unsigned long)k)) match = 0;
            got += (unsigned long)n;
        }
        int status = 1;
        if (writer < 0 || waitpid(writer, &status, 0) < 0 || !WIFEXITED(status) ||
            WEXITSTATUS(status) != 0)
            match = 0;
        i = match ? total : got;
        printf("sent=%lu got=%lu match=%s\n", i, got, match && got == total ? "yes" : "no");
        return 0;
    }
    fprintf(stderr, "usage: vsock-test echo PORT | stall PORT | send CID PORT BYTES\n");
    return 2;
}
